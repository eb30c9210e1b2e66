"""Cluster runs: template filling, the signal-forwarding task script, and a real SLURM array end to end."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from slurm_cluster import LocalSlurm
from tribunal.cli import main
from tribunal.cluster.slurm import TASK_SCRIPT, SubmitConfig, commands, write_scripts
from tribunal.store import open_store
from tribunal.store.verify import verify_store

TASK = str(TASK_SCRIPT)


def test_templates_are_filled(tmp_path):
    cfg = SubmitConfig(run_dir=str(tmp_path / "run"), shards=8, generate={"model": "org/model", "layers": "12,16",
                                                                         "max_new_tokens": 2048}, partition="gpu",
                       gpus=2, mem="64G", setup=["module load cuda/12", "source ~/venv/bin/activate"], max_requeues=3,
                       generate_args=["--keep-all"])
    gen, probe = write_scripts(cfg)
    text = gen.read_text()
    for line in ("#SBATCH --array=0-7", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 "#SBATCH --gres=gpu:2", "#SBATCH --mem=64G", "#SBATCH --open-mode=append", "TRIBUNAL_MAX_REQUEUES=3",
                 "--shard \"$SLURM_ARRAY_TASK_ID/8\"", "--model org/model", "--layers 12,16", "--max-new-tokens 2048",
                 "--keep-all"):
        assert line in text, line
    assert "@@" not in text and "@@" not in probe.read_text()
    lines = text.splitlines()
    last_directive = max(i for i, l in enumerate(lines) if l.startswith("#SBATCH"))
    first_command = min(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    assert last_directive < first_command  # sbatch ignores directives after the first command
    assert "module load cuda/12" in text and "#SBATCH --output=logs/generate_%a.log" in text
    assert "--gres" not in probe.read_text()
    cmds = commands(gen, probe)
    assert cmds[0] == f"cd {tmp_path / 'run'}" and cmds[1].startswith("GEN=$(sbatch --parsable")
    assert "--dependency=afterok:$GEN" in cmds[2]
    cpu = write_scripts(SubmitConfig(run_dir=str(tmp_path / "cpu"), shards=2, gpus=0))[0].read_text()
    assert "--gres" not in cpu and "--partition" not in cpu


CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda s, f: (print('child got USR1', flush=True), sys.exit(75)))
print('child' + '-ready', flush=True)  # not the echoed command line
time.sleep(60)
"""


def _task(tmp_path, env_extra, child=CHILD):
    env = {**os.environ, "TRIBUNAL_RUN_DIR": str(tmp_path), **env_extra}
    env.pop("SLURM_JOB_ID", None) if "SLURM_JOB_ID" not in env_extra else None
    proc = subprocess.Popen([TASK, sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
    while "child-ready" not in proc.stdout.readline():
        pass
    return proc


def test_task_script_forwards_usr1_outside_slurm(tmp_path):
    proc = _task(tmp_path, {})
    proc.send_signal(signal.SIGUSR1)  # a real USR1 to the bash process
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75
    assert "received USR1, forwarding to pid" in out and "child got USR1" in out and "not under SLURM" in out


def test_task_script_requeues_with_a_cap(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "0", "TRIBUNAL_MAX_REQUEUES": "2"}
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


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    reason = cluster.why_not()
    if reason:
        print(f"\nSKIP real SLURM tests: {reason}")
        pytest.skip(reason)
    try:
        cluster.start()
    except Exception as exc:
        cluster.stop()
        print(f"\nSKIP real SLURM tests: {exc}")
        pytest.skip(f"SLURM could not start here: {exc}")
    yield cluster
    cluster.stop()


def _wait(predicate, timeout, what, cluster):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")


def _commits(path):
    try:
        with open_store(path) as store:
            return store.shards[0].committed["commits"]
    except Exception:
        return 0


@pytest.mark.slurm
def test_array_preempt_requeue_resume_merge_probe(slurm, tmp_path, monkeypatch):
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run dir's \"quoted\""  # a space and both quotes: nothing in the scripts may break
    gen_args = ["--keep-all", "--samples-per-problem", "2", "--batch-size", "1", "--max-new-tokens", "48"]
    args = ["slurm", "submit", "--run-dir", str(run), "--shards", "3", "--gpus", "0", "--cpus", "1", "--time", "30",
            "--max-problems", "60", "--probe-time", "30", "--probe-memory", "1G", "--submit"]
    args += [f"--generate-arg={a}" for a in gen_args] + ["--probe-arg=--permutations", "--probe-arg=5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    gen, probe = jobs["generate"], jobs["probe"]
    shard0 = run / "shard_000.h5"
    # preempt task 0 once it is running and has committed something
    _wait(lambda: slurm.task_states(gen).get(f"{gen}_0") == "RUNNING" and _commits(shard0) >= 1, 120,
          "task 0 to run and commit", slurm)
    slurm.run(["scancel", "--signal=USR1", "--batch", f"{gen}_0"])
    _wait(lambda: (run / "requeues" / "task_0").exists(), 60, "task 0 to requeue itself", slurm)

    pending_since = []

    def restarted():
        state = slurm.task_states(gen).get(f"{gen}_0")
        if state == "PENDING":
            # A requeued job waits ~2 minutes unless told to start now; not within the requeue's own second,
            # which slurmd would refuse ("Job credential revoked": it compares whole seconds).
            pending_since.append(time.time())
            if time.time() - pending_since[0] > 3:
                slurm.run(["scontrol", "update", f"jobid={gen}_0", "StartTime=now"], check=False)
        log = (run / "logs" / "generate_0.log").read_text() if (run / "logs" / "generate_0.log").exists() else ""
        return "restart 1" in log

    _wait(restarted, 120, "task 0 to restart", slurm)
    _wait(lambda: not slurm.task_states(gen) and not slurm.task_states(probe), 900, "the array and the probe job", slurm)

    log0 = (run / "logs" / "generate_0.log").read_text()
    assert "received USR1, forwarding" in log0 and "requeueing" in log0
    assert "resuming" in log0 and "restart 1" in log0, log0
    status = CliRunner().invoke(main, ["slurm", "status", str(run), "--json"])
    rows = json.loads(status.output)
    assert [r["requeues"] for r in rows] == [1, 0, 0] and not any(r["writer_live"] for r in rows)
    merged = tmp_path / "merged.h5"
    assert CliRunner().invoke(main, ["merge", str(run / "shard_*.h5"), "-o", str(merged), "--quiet"]).exit_code == 0
    with open_store(merged) as store:
        assert verify_store(store) == []
        pairs = sorted(zip(store.table["problem_id"].tolist(), store.table["sample_index"].tolist()))
    assert pairs == [(p, s) for p in range(60) for s in range(2)]  # every pair exactly once
    probe_log = (run / "logs" / "probe.log").read_text()
    assert "OK:" in probe_log, probe_log
    assert (run / "probes" / "implicit_value_directions.json").exists(), probe_log
    assert (run / "probes" / "token_probe.png").exists()


def test_status_table_without_a_queue(tmp_path):
    """Read from the stores alone (no squeue here): traces by label, tokens, size, writer, requeues."""
    from conftest import make_record, writer_kwargs
    from tribunal.store import StoreWriter

    run = tmp_path / "run"
    write_scripts(SubmitConfig(run_dir=str(run), shards=3, gpus=0))
    with StoreWriter(run / "shard_000.h5", **writer_kwargs()) as w:
        w.append([make_record(i) for i in range(0, 9, 3)])  # three 'correct' traces
    (run / "requeues").mkdir()
    (run / "requeues" / "task_0").write_text("2026-11-25T10:00:00 job 7 restart 0\n")
    result = CliRunner().invoke(main, ["slurm", "status", str(run)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:5] == ["shard", "traces", "correct", "incorrect", "unparsed"]
    assert lines[1].split()[:5] == ["0", "3", "3", "0", "0"] and lines[1].split()[8] == "1"
    assert lines[2].split()[:2] == ["1", "0"] and len(lines) == 4


def test_submit_takes_every_generate_option_from_the_one_definition(tmp_path):
    """The generator's options are defined once (GenerateConfig): `generate`, `run` and `slurm submit` all offer
    each of them, and submit writes the non-default ones into the task command."""
    from tribunal.traces.settings import GenerateConfig

    flags = {"--" + f.name.replace("_", "-") for f in GenerateConfig.cli_fields()}
    for command in (["generate"], ["run"], ["slurm", "submit"]):
        help_text = CliRunner().invoke(main, [*command, "--help"], terminal_width=200).output
        expected = flags - ({"--shard"} if command == ["slurm", "submit"] else set())
        missing = [f for f in expected if f not in help_text]
        assert not missing, (command, missing)
    run = tmp_path / "r"
    result = CliRunner().invoke(main, ["slurm", "submit", "--run-dir", str(run), "--temperature", "0.6",
                                       "--no-chat-template", "--capture-memory", "16G", "--keep-all", "--seed", "3",
                                       "--engine", "vllm", "--vllm-memory", "0.4"])
    assert result.exit_code == 0, result.output
    text = (run / "slurm" / "generate.sbatch").read_text()
    for part in ("--temperature 0.6", "--no-chat-template", "--capture-memory 16G", "--keep-all", "--seed 3",
                 "--engine vllm", "--vllm-memory 0.4"):
        assert part in text, part
    assert "--top-p" not in text  # defaults are left to the task's own defaults
