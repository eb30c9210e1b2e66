"""The generator and cluster failure paths a cluster user meets first: model paths spelled another way,
stop signals during start-up, failed requeues, odd run folders, time limits, installed packages, capture memory."""

import json
import shutil

import pytest

from tribunal.errors import TribunalError
from tribunal.store import open_store
from tribunal.traces.generate import GenerateConfig, run_generation


def small_run(out, model, dataset, **kw):
    base = dict(out=str(out), model=str(model), dataset=str(dataset), layers="1", max_new_tokens=8,
                samples_per_problem=1, batch_size=2, max_problems=4, keep_all=True, progress=False)
    return GenerateConfig(**{**base, **kw})


def test_resume_does_not_depend_on_how_a_local_model_path_is_spelled(tmp_path, tiny_model, small_problems, monkeypatch):
    first = tmp_path / "jobA"
    (first / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, first / "models" / "m")
    shutil.copy(small_problems, first / "problems.jsonl")
    monkeypatch.chdir(first)
    out = tmp_path / "store.h5"
    part = run_generation(small_run(out, "models/m", "problems.jsonl", max_problems=2))
    assert part["status"] == "done" and part["traces"] == 2
    # the same model and data spelled as absolute paths: resumes
    again = run_generation(small_run(out, first / "models" / "m", first / "problems.jsonl", max_problems=2))
    assert again["traces"] == 2 and again["new_tokens"] == 0
    # a requeued task in another working directory, with its own copy of the model and data: resumes
    second = tmp_path / "jobB"
    (second / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, second / "models" / "m")
    shutil.copy(small_problems, second / "problems.jsonl")
    monkeypatch.chdir(second)
    assert run_generation(small_run(out, "./models/m", "problems.jsonl", max_problems=2))["new_tokens"] == 0
    with open_store(out) as store:
        assert store.model_id == str((first / "models" / "m").resolve())
        assert store.attrs["model_revision"].startswith("local:")
    # other weights under the same path are another model: refused, naming it
    import torch
    from safetensors.torch import load_file, save_file

    weights = second / "models" / "m" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(TribunalError, match="model_revision: store has 'local:"):
        run_generation(small_run(out, "models/m", "problems.jsonl", max_problems=2))
    del torch


# -- stop signals, requeues, time limits ----------------------------------------------------------------------

import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from tribunal.cli import main
from tribunal.cluster.slurm import TASK_SCRIPT


@pytest.mark.parametrize("delay", [0.15, 0.5, 1.0])
def test_a_stop_signal_in_the_first_second_is_resumable(tmp_path, tiny_model, small_problems, python_env, delay):
    out = tmp_path / "s.h5"
    args = [sys.executable, "-m", "tribunal", "generate", "--out", str(out), "--model", str(tiny_model), "--dataset",
            str(small_problems), "--layers", "1", "--max-new-tokens", "8", "--max-problems", "2", "--quiet"]
    proc = subprocess.Popen(args, env=python_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, (proc.returncode, stdout, stderr)
    assert "stopped by SIGUSR1" in stdout, stdout
    # and the same command then runs to the end
    done = subprocess.run(args, env=python_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


CHILD_UNPREPARED = """
import time
print('child' + '-ready', flush=True)
time.sleep(60)
"""


def _task(tmp_path, env_extra, child):
    env = {**os.environ, "TRIBUNAL_RUN_DIR": str(tmp_path), **env_extra}
    if "SLURM_JOB_ID" not in env_extra:
        env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen([str(TASK_SCRIPT), sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
    while "child-ready" not in proc.stdout.readline():
        pass
    return proc


def test_task_script_treats_death_by_the_forwarded_signal_as_resumable(tmp_path):
    proc = _task(tmp_path, {}, CHILD_UNPREPARED)  # a child with no handler: USR1 kills it (exit 138)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75 and "died of the forwarded USR1" in out, out


def test_a_failed_requeue_exits_non_zero_and_says_so(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho 'slurm_requeue error: Access/permission denied' >&2\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "0"}
    child = CHILD_UNPREPARED.replace("import time", "import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda s, f: sys.exit(75))")
    proc = _task(tmp_path, env, child)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75, out
    assert "scontrol requeue 77_1 FAILED: slurm_requeue error: Access/permission denied" in out, out
    assert not (tmp_path / "requeues" / "task_1").read_text().strip()  # no requeue is counted


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
    """tribunal built as a wheel and installed into a fresh venv outside the checkout (its dependencies come
    from the system site-packages: no network here)."""
    from conftest import ROOT

    where = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(where / "dist"), str(ROOT)], capture_output=True, text=True, cwd=where)
    assert build.returncode == 0, build.stderr
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    wheel = next((where / "dist").glob("tribunal-*.whl"))
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True, cwd=where)
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
    assert (run / "slurm" / "tribunal-task").exists() and "/work" not in script.read_text().split("# ---- tribunal: no edits")[1].split("shard=")[0]
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


# -- capture memory on long traces ---------------------------------------------------------------------------

CAPTURE_PEAK = """
import json, sys
from pathlib import Path
from tribunal.traces.generate import GenerateConfig, run_generation
import torch, transformers  # imported before the baseline is read: only the run's own memory counts
def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
base = kib("VmRSS:")
summary = run_generation(GenerateConfig(out=sys.argv[1], model=sys.argv[2], dataset=sys.argv[3], layers="all",
    max_new_tokens=int(sys.argv[5]), samples_per_problem=4, batch_size=16, max_problems=2, keep_all=True,
    capture_memory=sys.argv[4], progress=False))
print(json.dumps({"peak": (kib("VmHWM:") - base) * 1024, "traces": summary["traces"], "tokens": summary["tokens"]}))
"""


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """32 layers of width 256 with one KV head: 16 KB of capture a token at --layers all, little else that grows."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tribunal.traces.models import EMBEDDED_MODEL

    path = tmp_path_factory.mktemp("deep")
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    vocab = len(tok)
    # an end-of-sequence token beyond the model's vocabulary: every trace runs to --max-new-tokens
    tok.add_special_tokens({"eos_token": "<never-sampled>"})
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=64, num_hidden_layers=32,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_capture_memory_bounds_peak_host_memory(tmp_path, deep_model, small_problems, python_env):
    """8 traces of 150 new tokens: a 24 MB capture rectangle in one batch, held several times over while it
    travels to the writer. A 24 MB budget takes one trace a batch and keeps the run's peak within it."""
    budget, runs = 24 << 20, {}
    for name, limit, new in (("floor", "64G", 4), ("bounded", str(budget), 150), ("unbounded", "64G", 150)):
        done = subprocess.run([sys.executable, "-c", CAPTURE_PEAK, str(tmp_path / f"{name}.h5"), str(deep_model),
                               str(small_problems), limit, str(new)], env=python_env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        assert runs[name]["traces"] == 8
    assert runs["bounded"]["tokens"] == runs["unbounded"]["tokens"] > 8 * 150
    floor = runs["floor"]["peak"]  # the model, the tokenizer, the writer's pipe: what any run takes
    assert runs["bounded"]["peak"] - floor < budget, runs
    assert runs["unbounded"]["peak"] - floor > budget, runs  # the bound is what keeps it there
    with open_store(tmp_path / "bounded.h5") as a, open_store(tmp_path / "unbounded.h5") as b:
        import numpy as np

        for i in range(a.n_traces):  # per-trace seeds: smaller batches sample the same traces
            np.testing.assert_array_equal(a.trace(i).token_ids, b.trace(i).token_ids)


def test_a_budget_that_holds_no_trace_is_refused_clearly(tmp_path, tiny_model, small_problems):
    with pytest.raises(TribunalError, match="--capture-memory 1M holds no trace.*raise --capture-memory"):
        run_generation(small_run(tmp_path / "s.h5", tiny_model, small_problems, capture_memory="1M",
                                 max_new_tokens=5000, layers="all"))
