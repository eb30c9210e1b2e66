"""tribunal-task, the script each SLURM array task runs its shard under: it forwards the stop signal, requeues an
interrupted shard (with a cap), and never lets an unfinished shard look completed. Real bash, real signals; a
fake `scontrol` where SLURM would be asked to requeue."""

import os
import signal
import subprocess
import sys

from tribunal.cluster.slurm import TASK_SCRIPT

TASK = str(TASK_SCRIPT)

CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda s, f: (print('child got USR1', flush=True), sys.exit(75)))
print('child' + '-ready', flush=True)  # not the echoed command line
time.sleep(60)
"""
CHILD_WITHOUT_HANDLER = """
import time
print('child' + '-ready', flush=True)
time.sleep(60)
"""


def _task(tmp_path, env_extra, child=CHILD):
    """tribunal-task running `python -c child`, returned once the child is up (so a signal reaches it)."""
    env = {**os.environ, "TRIBUNAL_RUN_DIR": str(tmp_path), **env_extra}
    if "SLURM_JOB_ID" not in env_extra:
        env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen([TASK, sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
    seen = []
    while not seen or "child-ready" not in seen[-1]:
        seen.append(proc.stdout.readline())
        assert seen[-1], f"the task ended before its child was ready: {''.join(seen)}"
    return proc


def _fake_scontrol(tmp_path, body):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\n{body}\n")
    (fake / "scontrol").chmod(0o755)
    return {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77",
            "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "0"}


def test_task_script_forwards_usr1_outside_slurm(tmp_path):
    proc = _task(tmp_path, {})
    proc.send_signal(signal.SIGUSR1)  # a real USR1 to the bash process
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75
    assert "received USR1, forwarding to pid" in out and "child got USR1" in out and "not under SLURM" in out


def test_task_script_requeues_with_a_cap(tmp_path):
    env = {**_fake_scontrol(tmp_path, f'echo "$@" >> {tmp_path}/scontrol.calls'), "TRIBUNAL_MAX_REQUEUES": "2"}
    proc = _task(tmp_path, env)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "requeueing 77_1" in out
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "77_1"]
    assert len((tmp_path / "requeues" / "task_1").read_text().splitlines()) == 1
    proc = _task(tmp_path, {**env, "SLURM_RESTART_COUNT": "2"})
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75 and "giving up" in out
    assert len((tmp_path / "scontrol.calls").read_text().splitlines()) == 1


def test_task_script_passes_success_and_failure(tmp_path):
    ok = subprocess.run([TASK, sys.executable, "-c", "print('fine')"], capture_output=True, text=True)
    assert ok.returncode == 0 and "done" in ok.stdout
    bad = subprocess.run([TASK, sys.executable, "-c", "import sys; sys.exit(3)"], capture_output=True, text=True,
                         env={**os.environ, "SLURM_JOB_ID": "5"})
    assert bad.returncode == 3 and "not requeueing" in bad.stdout


def test_task_script_treats_death_by_the_forwarded_signal_as_resumable(tmp_path):
    proc = _task(tmp_path, {}, CHILD_WITHOUT_HANDLER)  # USR1 kills a child with no handler (exit 138)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75 and "died of the forwarded USR1" in out, out


def test_a_failed_requeue_exits_non_zero_and_says_so(tmp_path):
    env = _fake_scontrol(tmp_path, "echo 'slurm_requeue error: Access/permission denied' >&2\nexit 1")
    proc = _task(tmp_path, env)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75, out
    assert "scontrol requeue 77_1 FAILED: slurm_requeue error: Access/permission denied" in out, out
    assert not (tmp_path / "requeues" / "task_1").read_text().strip()  # no requeue is counted
