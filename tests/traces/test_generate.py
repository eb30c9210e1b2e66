"""The generator end to end (tribunal.traces.generate) with real (tiny) models, real tokenizers, real stores and real
subprocesses: what it stores, resuming, targets, shards, configuration and bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from conftest import R1_TEMPLATE

from tribunal.cli import main
from tribunal.errors import TribunalError
from tribunal.grading import extract_answer
from tribunal.problems.loading import load_problems, shard_problems
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.generate import EXIT_INTERRUPTED, GenerateConfig, run_generation


def cfg(tmp_path, tiny_model, small_problems, name="g.h5", **kw):
    base = dict(out=str(tmp_path / name), model=str(tiny_model), dataset=str(small_problems), layers="1,3",
                max_new_tokens=24, samples_per_problem=2, batch_size=4, max_problems=6, keep_all=True,
                progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def keys(store):
    return sorted(zip(store.table["problem_id"].tolist(), store.table["sample_index"].tolist()))


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("float16", 2e-2), ("bfloat16", 6e-2)])
def test_stored_activations_equal_a_teacher_forced_pass(tmp_path, tiny_model, small_problems, dtype, atol):
    summary = run_generation(cfg(tmp_path, tiny_model, small_problems, dtype=dtype))
    assert summary["status"] == "done" and summary["traces"] == 12
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with open_store(tmp_path / "g.h5") as store:
        assert store.dtype == dtype and list(store.layers) == [1, 3]
        assert verify_store(store) == []
        for i in range(store.n_traces):
            t = store.trace(i)
            seen = {}
            hooks = [model.model.layers[l].register_forward_hook(
                lambda m, a, o, l=l: seen.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[0].numpy()))
                for l in (1, 3)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(t.token_ids[None].astype(np.int64))).logits[0]
            for h in hooks:
                h.remove()
            for layer in (1, 3):
                np.testing.assert_allclose(store.activations(layer, i), seen[layer], atol=atol, rtol=atol)
            # the stored log-probs are those of the sampled tokens under the model
            logp = torch.log_softmax(logits.float(), -1).numpy()
            gen = np.flatnonzero(t.is_generated)
            expected = logp[gen - 1, t.token_ids[gen]]
            np.testing.assert_allclose(t.logprobs[gen], expected, atol=1e-3)
            assert np.all(t.entropies[gen] >= 0)


def test_resume_skips_done_pairs_and_matches_an_uninterrupted_run(tmp_path, tiny_model, small_problems):
    run_generation(cfg(tmp_path, tiny_model, small_problems, name="whole.h5"))
    part = run_generation(cfg(tmp_path, tiny_model, small_problems, name="part.h5", max_problems=3))
    assert part["problems_tried"] == 3
    # same store, more problems: the resume identity includes max_problems, so it is refused ...
    with pytest.raises(TribunalError, match="max_problems"):
        run_generation(cfg(tmp_path, tiny_model, small_problems, name="part.h5"))
    # ... while rerunning the same command continues and adds nothing
    again = run_generation(cfg(tmp_path, tiny_model, small_problems, name="part.h5", max_problems=3))
    assert again["traces"] == part["traces"] and again["new_tokens"] == 0
    with open_store(tmp_path / "whole.h5") as a, open_store(tmp_path / "part.h5") as b:
        assert keys(b) == keys(a)[: len(keys(b))]
        for i in range(b.n_traces):  # per-trace seeds: the same traces, batch or no batch
            np.testing.assert_array_equal(a.trace(i).token_ids, b.trace(i).token_ids)


def test_resume_does_not_depend_on_how_a_local_model_path_is_spelled(tmp_path, tiny_model, small_problems, monkeypatch):
    def small_run(out, model, dataset):
        return GenerateConfig(out=str(out), model=str(model), dataset=str(dataset), layers="1", max_new_tokens=8,
                              samples_per_problem=1, batch_size=2, max_problems=2, keep_all=True, progress=False)

    first = tmp_path / "jobA"
    (first / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, first / "models" / "m")
    shutil.copy(small_problems, first / "problems.jsonl")
    monkeypatch.chdir(first)
    out = tmp_path / "store.h5"
    part = run_generation(small_run(out, "models/m", "problems.jsonl"))
    assert part["status"] == "done" and part["traces"] == 2
    # the same model and data spelled as absolute paths: resumes
    again = run_generation(small_run(out, first / "models" / "m", first / "problems.jsonl"))
    assert again["traces"] == 2 and again["new_tokens"] == 0
    # a requeued task in another working directory, with its own copy of the model and data: resumes
    second = tmp_path / "jobB"
    (second / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, second / "models" / "m")
    shutil.copy(small_problems, second / "problems.jsonl")
    monkeypatch.chdir(second)
    assert run_generation(small_run(out, "./models/m", "problems.jsonl"))["new_tokens"] == 0
    with open_store(out) as store:
        assert store.model_id == str((first / "models" / "m").resolve())
        assert store.attrs["model_revision"].startswith("local:")
    # other weights under the same path are another model: refused, naming it
    from safetensors.torch import load_file, save_file

    weights = second / "models" / "m" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(TribunalError, match="model_revision: store has 'local:"):
        run_generation(small_run(out, "models/m", "problems.jsonl"))


def test_targets_stop_storing_a_label(tmp_path):
    """The embedded model answers right and wrong about half the time: a batch of 16 traces grades several of each,
    and targets of 2 and 2 store exactly 2 of each (a label past its target is graded but not stored)."""
    out = tmp_path / "t.h5"
    s = run_generation(GenerateConfig(out=str(out), keep_all=False, target_correct=2, target_incorrect=2,
                                      max_problems=8, samples_per_problem=4, batch_size=16, progress=False))
    assert s["status"] == "done" and s["targets_met"]
    with open_store(out) as store:
        labels = store.label_counts()
        assert labels.get("correct") == 2 and labels.get("incorrect") == 2, labels
        assert store.n_traces == sum(labels.values()) == s["traces"]
        assert verify_store(store) == []


def test_shards_cover_the_problems_exactly_once(tmp_path, tiny_model, small_problems):
    problems = load_problems(str(small_problems))
    parts = [shard_problems(problems, i, 3, 10) for i in range(3)]
    ids = sorted(p.problem_id for part in parts for p in part)
    assert ids == list(range(10))
    for i in range(3):
        s = run_generation(cfg(tmp_path, tiny_model, small_problems, name=f"s{i}.h5", shard=f"{i}/3", max_problems=10,
                               samples_per_problem=1))
        assert s["problems_in_shard"] == len(parts[i])
    with open_store(str(tmp_path / "s*.h5")) as store:
        stored = keys(store)
        assert verify_store(store) == []
    assert stored == [(p, 0) for p in range(10)]


def test_config_file_and_command_line(tmp_path, tiny_model, small_problems):
    conf = tmp_path / "run.yaml"
    conf.write_text(f"model: {tiny_model}\ndataset: {small_problems}\nlayers: '2'\nmax-new-tokens: 8\n"
                    "samples_per_problem: 1\nmax_problems: 2\ntemperature: 0.7\nkeep_all: true\n")
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(main, ["generate", "--config", str(conf), "--out", str(out), "--temperature", "1.3", "--quiet"])
    assert result.exit_code == 0, result.output
    with open_store(out) as store:
        settings = store.attrs["generation_settings"]
        assert settings["temperature"] == 1.3 and settings["max_new_tokens"] == 8 and list(store.layers) == [2]
    toml = tmp_path / "run.toml"
    toml.write_text('bogus_key = 3\n')
    result = CliRunner().invoke(main, ["generate", "--config", str(toml), "--out", str(out)])
    assert result.exit_code == 2 and "unknown key(s) ['bogus_key']" in result.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/nonexistent/model"], "cannot load model"),
        (["--layers", "9"], "out of range: the model has 4 decoder layers (0..3)"),
    ],
)
def test_bad_input(tmp_path, tiny_model, small_problems, args, needle):
    base = ["generate", "--out", str(tmp_path / "b.h5"), "--model", str(tiny_model), "--dataset", str(small_problems),
            "--quiet", "--max-problems", "1"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output


def test_dataset_without_fields_and_store_of_another_model(tmp_path, tiny_model, small_problems):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "solution": "y"}) + "\n")
    result = CliRunner().invoke(main, ["generate", "--out", str(tmp_path / "x.h5"), "--model", str(tiny_model),
                                       "--dataset", str(bad), "--quiet"])
    assert result.exit_code == 1 and "rows lack a question or an answer field" in result.output
    run_generation(cfg(tmp_path, tiny_model, small_problems, max_problems=1))
    result = CliRunner().invoke(main, ["generate", "--out", str(tmp_path / "g.h5"), "--dataset", str(small_problems),
                                       "--quiet"])  # the embedded model, not the tiny one
    assert result.exit_code == 1 and "model_id" in result.output and "different settings" in result.output


def generate_command(tiny_model, small_problems, out):
    return [sys.executable, "-m", "tribunal.cli", "generate", "--out", str(out), "--model", str(tiny_model),
            "--dataset", str(small_problems), "--layers", "1,3", "--max-new-tokens", "40", "--samples-per-problem", "2",
            "--batch-size", "2", "--max-problems", "16", "--keep-all", "--quiet"]


def wait_for_commits(out, n, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            try:
                with open_store(out) as store:
                    if store.shards[0].committed["commits"] >= n:
                        return
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError("the generator made no commits in time")


def test_kill9_and_resume(tmp_path, tiny_model, small_problems, python_env):
    out = tmp_path / "k.h5"
    proc = subprocess.Popen(generate_command(tiny_model, small_problems, out), env=python_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_commits(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = subprocess.run(generate_command(tiny_model, small_problems, out), env=python_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    verify = subprocess.run([sys.executable, "-m", "tribunal.cli", "verify", str(out)], env=python_env,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    with open_store(out) as store:
        assert keys(store) == sorted((p, s) for p in range(16) for s in range(2))  # each pair once


def test_embedded_default_end_to_end(tmp_path):
    """`tribunal generate --out X` with no model and no dataset: offline, a real mix of right and wrong."""
    out = tmp_path / "default.h5"
    result = CliRunner().invoke(main, ["generate", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "correct 50, incorrect 50" in result.output
    with open_store(out) as store:
        assert verify_store(store) == [] and store.model_id == "tribunal/embedded-default"
        assert store.attrs["generation_settings"]["temperature"] == 1.0
    shown = CliRunner().invoke(main, ["inspect", "--trace", "0", str(out)])
    assert shown.exit_code == 0 and "'</think>'" in shown.output  # tokens decoded with the embedded tokenizer
    mix = run_generation(GenerateConfig(out=str(tmp_path / "mix.h5"), keep_all=True, max_problems=40, progress=False))
    share = mix["labels"].get("correct", 0) / mix["traces"]
    assert 0.3 <= share <= 0.7, mix["labels"]


def test_hub_ids_offline_give_clear_errors(tmp_path, small_problems, python_env):
    """In a fresh process: the hub libraries read HF_HUB_OFFLINE when they are imported."""
    env = {**python_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cli = [sys.executable, "-m", "tribunal.cli", "generate", "--out", str(tmp_path / "h.h5"), "--quiet"]
    r = subprocess.run(cli + ["--dataset", "openai/gsm8k"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "cannot load dataset 'openai/gsm8k' split 'test' from the hub" in r.stderr
    r = subprocess.run(cli + ["--model", "org/not-here", "--dataset", str(small_problems)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cannot load model 'org/not-here' as a Hugging Face id" in r.stderr
    assert "Traceback" not in r.stderr


def test_engine_vllm_without_vllm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm fails here as on a machine without it
    out = tmp_path / "v.h5"
    result = CliRunner().invoke(main, ["generate", "--engine", "vllm", "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "pip install 'tribunal[vllm]'" in result.output and "--engine hf" in result.output
    assert not out.exists()  # refused before the store was touched
    bad = CliRunner().invoke(main, ["generate", "--engine", "vllm", "--vllm-memory", "1.5", "--out", str(out)])
    assert bad.exit_code != 0 and "--vllm-memory must be a fraction" in bad.output


def test_sigusr1_gives_the_resumable_exit_code(tmp_path, tiny_model, small_problems, python_env):
    out = tmp_path / "u.h5"
    proc = subprocess.Popen(generate_command(tiny_model, small_problems, out), env=python_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_commits(out, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "stopped by SIGUSR1" in stdout
    with open_store(out) as store:  # closed cleanly: no live writer, invariants hold
        assert verify_store(store) == [] and 0 < store.n_traces < 32
    from tribunal.store.lock import lock_path

    assert not lock_path(out).exists()


def test_generator_grades_with_the_prompts_thinking(tmp_path, tiny_model, small_problems):
    """A tiny random model behind an R1 template never closes its thinking in 24 tokens: every trace is
    unparsed, although the texts hold numbers the old grader took as answers; the store records both the
    thinking prompt and each finish reason."""
    import shutil

    from tribunal.traces.generate import GenerateConfig, run_generation

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = R1_TEMPLATE
    model_dir = tmp_path / "r1-model"
    shutil.copytree(tiny_model, model_dir)
    tok.save_pretrained(model_dir)
    summary = run_generation(GenerateConfig(out=str(tmp_path / "r1.h5"), model=str(model_dir), dataset=str(small_problems),
                                            layers="1", max_new_tokens=24, samples_per_problem=2, batch_size=4,
                                            max_problems=6, keep_all=True, progress=False))
    assert summary["status"] == "done"
    with open_store(tmp_path / "r1.h5") as store:
        settings = store.attrs["generation_settings"]
        settings = json.loads(settings) if isinstance(settings, str) else settings
        assert settings["prompt_opens_thinking"] is True
        texts = [store.trace(i) for i in range(store.n_traces)]
    assert all(t.label == "unparsed" for t in texts if "</think>" not in t.text)
    assert {t.finish_reason for t in texts} <= {"stop", "length"}
    with_numbers = [t for t in texts if any(ch.isdigit() for ch in t.text)]
    assert with_numbers, "the random model wrote no digit at all; the check above proves nothing"
    # a grader blind to thinking and to the finish reason would have labelled some of them
    assert any(extract_answer(t.text) is not None for t in with_numbers)
