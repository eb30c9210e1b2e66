"""tribunal slurm submit / status: template filling, time limits, the scripts from an installed wheel, and a real
single-node SLURM array end to end (preempted, requeued, resumed, merged, probed)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from tribunal.cli import main
from tribunal.cluster.slurm import SubmitConfig, commands, write_scripts
from tribunal.store import open_store
from tribunal.store.verify import verify_store

from .slurm_cluster import LocalSlurm


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


@pytest.mark.parametrize("limit", ["00:04:00", "5", "00:05:00", "4:59"])
def test_a_time_limit_within_the_signal_lead_is_refused(tmp_path, limit):
    result = CliRunner().invoke(main, ["slurm", "submit", "--run-dir", str(tmp_path / "r"), "--time", limit])
    assert result.exit_code == 1 and f"--time {limit}" in result.output and "USR1@300" in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_time_limits_are_parsed_as_slurm_does():
    from tribunal.cluster.slurm import time_limit_seconds

    assert [time_limit_seconds(t) for t in ("30", "30:15", "04:00:00", "1-12", "1-12:30", "1-00:00:10")] == [
        1800, 1815, 14400, 129600, 131400, 86410]


# -- the batch scripts from an installed wheel, in a run folder with a space and a quote ----------------------

@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """tribunal built as a wheel and installed into a new venv outside the checkout. No network here: the venv
    takes its dependencies from the site-packages this test session imports them from (a .pth file), so it works
    whether the suite runs in a venv (the README's setup) or in the system interpreter."""
    import site

    where = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(where / "dist"), str(ROOT)], capture_output=True, text=True, cwd=where)
    # offline, so no build isolation: this environment's setuptools builds it (>= 70.1, or older with `wheel`)
    assert build.returncode == 0, build.stdout + build.stderr + "\nneeds setuptools>=70.1: pip install -U setuptools"
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    # plain paths: the checkout's editable-install hook (a .pth in those folders) is not run, so the venv's
    # tribunal is the wheel's
    (Path(purelib) / "test-session-dependencies.pth").write_text("".join(p + "\n" for p in ours))
    wheel = next((where / "dist").glob("tribunal-*.whl"))
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, cwd=where)
    assert install.returncode == 0, install.stderr
    return venv


def test_submit_from_an_installed_wheel_runs_in_the_setup_environment(wheel_venv, tmp_path, tiny_model, small_problems):
    run = tmp_path / "run dir's \"odd\" name"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    submit = subprocess.run(
        [str(wheel_venv / "bin" / "tribunal"), "slurm", "submit", "--run-dir", str(run), "--shards", "1", "--gpus", "0",
         "--model", str(tiny_model), "--dataset", str(small_problems), "--max-problems", "2", "--time", "00:10:00",
         "--setup", f"source {wheel_venv}/bin/activate",
         "--setup", "python3 -c 'import tribunal; print(\"tribunal from\", tribunal.__file__)'",
         "--generate-arg=--max-new-tokens", "--generate-arg=8", "--generate-arg=--layers", "--generate-arg=1"],
        capture_output=True, text=True, cwd=tmp_path, env=env)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert f"cd {run}" not in submit.stdout and "cd '" in submit.stdout  # the printed commands quote the folder
    script = run / "slurm" / "generate.sbatch"
    filled = script.read_text().split("# ---- tribunal: no edits")[1].split("shard=")[0]
    assert (run / "slurm" / "tribunal-task").exists() and str(ROOT) not in filled  # nothing from the checkout
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # run the filled array task as sbatch would, from the run folder, outside any checkout
    job = subprocess.run(["bash", str(script)], cwd=run, capture_output=True, text=True, timeout=300,
                         env={**env, "SLURM_ARRAY_TASK_ID": "0"})
    assert job.returncode == 0, job.stdout + job.stderr
    assert f"tribunal from {wheel_venv}" in job.stdout, job.stdout
    with open_store(run / "shard_000.h5") as store:
        assert store.n_traces == 2 * 4
    probe = subprocess.run(["bash", "-n", str(run / "slurm" / "probe.sbatch")])
    assert probe.returncode == 0


# -- a real single-node SLURM ----------------------------------------------------------------------------------

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
            "--max-problems", "60", "--probe-time", "30", "--memory", "1G", "--submit"]
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
    assert (run / "probes" / "chunk_metrics.json").exists(), probe_log  # and the chunk probe, with early exit


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
