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

import signal
import subprocess
import sys
import time


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
