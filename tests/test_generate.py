"""The generator with real (tiny) models, real tokenizers, real stores and real subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import GSM8K, teacher_forced_states
from tribunal.cli import main
from tribunal.errors import TribunalError
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


def test_targets_stop_storing_a_label(tmp_path, tiny_model, small_problems):
    # the random tiny model never answers: every trace is unparsed, so targets are never met and
    # max_problems ends the run; with targets 0/0 nothing but unparsed traces is ever stored
    s = run_generation(cfg(tmp_path, tiny_model, small_problems, keep_all=False, target_correct=0, target_incorrect=0))
    assert s["problems_tried"] == 0 and s["traces"] == 0 and s["targets_met"]


def test_shards_cover_the_problems_exactly_once(tmp_path, tiny_model, small_problems):
    problems = load_problems(str(small_problems))
    parts = [shard_problems(problems, i, 3, 10) for i in range(3)]
    ids = sorted(p.problem_id for part in parts for p in part)
    assert ids == list(range(10))
    stored = []
    for i in range(3):
        s = run_generation(cfg(tmp_path, tiny_model, small_problems, name=f"s{i}.h5", shard=f"{i}/3", max_problems=10,
                               samples_per_problem=1))
        assert s["problems_in_shard"] == len(parts[i])
    with open_store(str(tmp_path / "s*.h5")) as store:
        stored = keys(store)
        assert verify_store(store) == []
    assert stored == [(p, 0) for p in range(10)]


def test_real_gsm8k_test_file(tmp_path, tiny_model):
    problems = load_problems(str(GSM8K / "test.jsonl"))
    assert len(problems) == 1319 and problems[0].gold == "18"
    assert load_problems(str(GSM8K), split="train")[0].question.startswith("Natalia")
    run_generation(cfg(tmp_path, tiny_model, GSM8K / "test.jsonl", max_problems=2, samples_per_problem=1,
                           max_new_tokens=8))
    with open_store(tmp_path / "g.h5") as store:
        assert store.n_traces == 2 and store.trace(0).gold == "18"
        assert store.attrs["dataset_id"].endswith("test.jsonl")


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


def _generate_cmd(tmp_path, tiny_model, small_problems, out, extra=()):
    return [sys.executable, "-m", "tribunal.cli", "generate", "--out", str(out), "--model", str(tiny_model),
            "--dataset", str(small_problems), "--layers", "1,3", "--max-new-tokens", "40", "--samples-per-problem", "2",
            "--batch-size", "2", "--max-problems", "16", "--keep-all", "--quiet", *extra]


def _wait_for_commits(out, n, proc, timeout=60):
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
    proc = subprocess.Popen(_generate_cmd(tmp_path, tiny_model, small_problems, out), env=python_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_commits(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = subprocess.run(_generate_cmd(tmp_path, tiny_model, small_problems, out), env=python_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    verify = subprocess.run([sys.executable, "-m", "tribunal.cli", "verify", str(out)], env=python_env,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    with open_store(out) as store:
        assert keys(store) == sorted((p, s) for p in range(16) for s in range(2))  # each pair once


def test_sigusr1_gives_the_resumable_exit_code(tmp_path, tiny_model, small_problems, python_env):
    out = tmp_path / "u.h5"
    proc = subprocess.Popen(_generate_cmd(tmp_path, tiny_model, small_problems, out), env=python_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_commits(out, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "stopped by SIGUSR1" in stdout
    with open_store(out) as store:  # closed cleanly: no live writer, invariants hold
        assert verify_store(store) == [] and 0 < store.n_traces < 32
    from tribunal.store.lock import lock_path

    assert not lock_path(out).exists()


def test_out_of_memory_halves_the_batch(tmp_path, tiny_model, small_problems, caplog):
    """No GPU here: a real torch.OutOfMemoryError is raised by the model while the batch is above 2 rows."""
    from tribunal.traces import models

    real_load = models.load_model

    def load_with_small_memory(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)

        def too_big(module, inputs):
            if inputs[0].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected: batch above 2 rows)")

        model.model.layers[0].register_forward_pre_hook(too_big)
        return model, tok

    models.load_model = load_with_small_memory
    try:
        with caplog.at_level("WARNING"):
            s = run_generation(cfg(tmp_path, tiny_model, small_problems, batch_size=8))
    finally:
        models.load_model = real_load
    assert s["traces"] == 12
    assert "halving the batch to 4" in caplog.text and "halving the batch to 2" in caplog.text


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
    assert shown.exit_code == 0 and "'think'" in shown.output  # tokens decoded with the embedded tokenizer
    mix = run_generation(GenerateConfig(out=str(tmp_path / "mix.h5"), keep_all=True, max_problems=40, progress=False))
    share = mix["labels"].get("correct", 0) / mix["traces"]
    assert 0.3 <= share <= 0.7, mix["labels"]


def test_local_json_and_parquet_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:5]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        problems = load_problems(str(tmp_path / name))
        assert [p.gold for p in problems] == [load_problems(str(GSM8K / "test.jsonl"))[i].gold for i in range(5)]


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


def test_stop_signal_while_the_model_loads_is_resumable(tmp_path, tiny_model, small_problems):
    """A preemption during loading: handlers are in place from the start, the store is not touched."""
    from tribunal.traces import models

    real_load = models.load_model

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while "loading"
        return real_load(*args, **kwargs)

    models.load_model = slow_load
    try:
        s = run_generation(cfg(tmp_path, tiny_model, small_problems))
    finally:
        models.load_model = real_load
    assert s["status"] == "interrupted" and s["signal"] == "SIGUSR1"
    assert not (tmp_path / "g.h5").exists()


def test_writer_combines_queued_batches_into_one_commit(tmp_path):
    """Whatever is queued when the writer gets to it goes to the store as one commit."""
    import queue

    from conftest import make_record, writer_kwargs
    from tribunal.traces.store_process import serve

    tasks, results = queue.Queue(), queue.Queue()
    for batch in range(3):
        tasks.put(([make_record(batch * 2), make_record(batch * 2 + 1)], [(batch, 2)]))
    tasks.put(None)
    serve(dict(path=tmp_path / "w.h5", **writer_kwargs()), tasks, results)
    opened, closed = results.get_nowait(), results.get_nowait()
    assert opened[0] == "opened" and opened[1]["n_traces"] == 0
    assert closed[0] == "closed" and closed[1]["n_traces"] == 6 and closed[1]["problems_done"] == {0, 1, 2}
    with open_store(tmp_path / "w.h5") as store:
        assert store.n_traces == 6 and verify_store(store) == []
        assert store.shards[0].committed["commits"] == 1


def test_writer_process_takes_batches_once_their_copies_land_and_yields_the_cpu(tmp_path):
    """A batch is handed over one put later, after its device-to-host copy is awaited; the writer
    process runs in SCHED_IDLE and ignores stop signals (the parent decides when to stop)."""
    from conftest import make_record, writer_kwargs
    from tribunal.traces.store_process import WriterProcess

    ready = []
    writes = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=2)
    assert writes.open()["n_traces"] == 0
    child = writes._process.pid
    assert os.sched_getscheduler(child) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the model's process keeps its priority
    for batch in range(3):
        writes.put([make_record(batch)], [], lambda batch=batch: ready.append(batch))
        assert ready == list(range(batch))
    os.kill(child, signal.SIGUSR1)
    os.kill(child, signal.SIGINT)
    state = writes.finish()
    assert ready == [0, 1, 2] and state["n_traces"] == 3
    with open_store(tmp_path / "w.h5") as store:
        assert store.n_traces == 3 and verify_store(store) == []


def test_writer_process_errors_reach_the_parent(tmp_path):
    """A store of other settings is refused in the child; the parent raises the same error."""
    from conftest import make_record, writer_kwargs
    from tribunal.errors import IncompatibleStoreError, StoreError
    from tribunal.traces.store_process import WriterProcess

    writes = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=2)
    writes.open()
    writes.put([make_record(0)], [], lambda: None)
    writes.finish()
    other = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs(d_model=32)), max_batches=2)
    with pytest.raises(IncompatibleStoreError, match="d_model"):
        other.open()
    # a batch the store refuses: the error comes back, the child still closes the store cleanly
    again = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=2)
    again.open()
    again.put([make_record(1, d_model=8)], [], lambda: None)
    with pytest.raises(StoreError, match="activations have shape"):
        again.finish()
    with open_store(tmp_path / "w.h5") as store:
        assert store.n_traces == 1 and verify_store(store) == []


def test_a_dead_writer_process_is_a_clear_error(tmp_path):
    """The run does not hang on a writer killed from outside; it says so and that rerunning resumes."""
    from conftest import make_record, writer_kwargs
    from tribunal.traces.store_process import WriterProcess

    writes = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=1)
    writes.open()
    os.kill(writes._process.pid, signal.SIGKILL)
    writes._process.wait()
    with pytest.raises(RuntimeError, match="writer process died.*rerun to resume"):
        writes.put([make_record(0)], [], lambda: None)
    with pytest.raises(RuntimeError, match="rerun to resume"):
        writes.finish()


def test_last_token_is_captured_without_running_the_blocks_above(tiny_model):
    """The forward that captures the last sampled token stops at the deepest target layer."""
    from tribunal.traces.models import decoder_blocks, load_model
    from tribunal.traces.sampling import BlockCapture, SamplingSettings, sample_batch

    model, tok = load_model(str(tiny_model))
    blocks = decoder_blocks(model)
    calls = {"top": 0}
    counter = blocks[-1].register_forward_hook(lambda *a: calls.__setitem__("top", calls["top"] + 1))
    capture = BlockCapture(blocks, [1])
    try:
        prompt = tok("Tom has 3 apples.")["input_ids"]
        (trace,) = sample_batch(model, capture, [prompt], [7], SamplingSettings(1.0, 1.0, 9), {tok.eos_token_id},
                                tok.pad_token_id)
    finally:
        counter.remove()
        capture.remove()
    steps = len(trace.generated_ids)
    assert trace.activations.shape == (1, len(prompt) + steps, model.config.hidden_size)
    assert calls["top"] == steps  # the prompt, then every sampled token but the last


def test_last_forward_runs_only_the_traces_that_ended_last(tiny_model):
    """Traces that ended early had their last token fed while the batch ran on; the last forward takes
    only the traces that ended at the final step, and every trace's states still equal a
    teacher-forced pass."""
    from tribunal.traces.models import decoder_blocks, load_model
    from tribunal.traces.sampling import BlockCapture, SamplingSettings, sample_batch

    model, tok = load_model(str(tiny_model))
    blocks = decoder_blocks(model)
    widths = []
    counter = blocks[0].register_forward_hook(
        lambda m, a, o: widths.append((o[0] if isinstance(o, tuple) else o).shape[0]))
    capture = BlockCapture(blocks, [1, 2])
    stops = set(range(0, len(tok), 3))  # a third of the vocabulary ends a trace: traces end at different steps
    questions = ("Tom has 3 apples.", "Ann buys 12 pens and 4 books.", "5 + 7 =", "Bo runs")
    prompts = [tok(q)["input_ids"] for q in questions]
    try:
        traces = sample_batch(model, capture, prompts, [1, 2, 3, 4], SamplingSettings(1.0, 1.0, 30), stops,
                              tok.pad_token_id, store_dtype="float32")
    finally:
        counter.remove()
        capture.remove()
    lengths = [len(t.generated_ids) for t in traces]
    assert len(set(lengths)) > 1 and widths[-1] == lengths.count(max(lengths)) < len(prompts)
    for prompt, t in zip(prompts, traces):
        seen = teacher_forced_states(model, blocks, t.prompt_ids + t.generated_ids, (1, 2))
        assert t.activations.shape[1] == len(prompt) + len(t.generated_ids)
        for i, layer in enumerate((1, 2)):
            np.testing.assert_allclose(t.activations[i], seen[layer], atol=1e-4, rtol=1e-4)


def test_a_batch_keeps_its_activations_when_the_capture_buffer_is_reused(tiny_model):
    """The capture buffer lives from batch to batch (growing when one needs more): what a batch
    returned must not change when the next batch overwrites the buffer."""
    from tribunal.traces.models import decoder_blocks, load_model
    from tribunal.traces.sampling import BlockCapture, SamplingSettings, sample_batch

    model, tok = load_model(str(tiny_model))
    blocks = decoder_blocks(model)
    capture = BlockCapture(blocks, [2])
    batches = [["Ann buys 12 pens and 4 books.", "Bo runs 5 km a day for 3 days."],  # sizes the buffer
               ["Tom has 3 apples."],  # fits: overwrites the first batch's part of the buffer
               ["Sam has 7 cats and 2 dogs.", "5 + 7 =", "Each of 4 boxes holds 6 eggs, 3 break."]]  # grows it
    try:
        results = [sample_batch(model, capture, [tok(q)["input_ids"] for q in questions], list(range(len(questions))),
                                SamplingSettings(1.0, 1.0, 12), {tok.eos_token_id}, tok.pad_token_id,
                                store_dtype="float32")
                   for questions in batches]
    finally:
        capture.remove()
    for trace in [t for traces in results for t in traces]:
        seen = teacher_forced_states(model, blocks, trace.prompt_ids + trace.generated_ids, (2,))
        np.testing.assert_allclose(trace.activations[0], seen[2], atol=1e-4, rtol=1e-4)


def test_a_script_without_a_main_guard_can_generate(tmp_path, tiny_model, small_problems, python_env):
    """The writer process is its own module's __main__: the caller's script is not re-run in it."""
    script = tmp_path / "quick.py"
    script.write_text(
        "from tribunal.traces.generate import GenerateConfig, run_generation\n"
        "print('RUN')\n"
        f"s = run_generation(GenerateConfig(out={str(tmp_path / 'g.h5')!r}, model={str(tiny_model)!r}, "
        f"dataset={str(small_problems)!r}, layers='1', max_new_tokens=8, samples_per_problem=1, "
        "max_problems=2, keep_all=True, progress=False))\n"
        "print(s['status'], s['traces'])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=python_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RUN", "done", "2"]


def test_engine_vllm_without_vllm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm fails here as on a machine without it
    out = tmp_path / "v.h5"
    result = CliRunner().invoke(main, ["generate", "--engine", "vllm", "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "pip install 'tribunal[vllm]'" in result.output and "--engine hf" in result.output
    assert not out.exists()  # refused before the store was touched
    bad = CliRunner().invoke(main, ["generate", "--engine", "vllm", "--vllm-memory", "1.5", "--out", str(out)])
    assert bad.exit_code != 0 and "--vllm-memory must be a fraction" in bad.output


def test_vllm_engine_starts_about_as_many_traces_as_the_targets_need():
    """vLLM is fed what the targets still need (x1.5, from the labels graded so far), not its whole batch."""
    from collections import Counter
    from types import SimpleNamespace

    from tribunal.traces.vllm_engine import _traces_to_start

    def run(counts, graded, keep_all=False):
        return SimpleNamespace(config=SimpleNamespace(keep_all=keep_all), target={"correct": 50, "incorrect": 50},
                               counts=Counter(counts), graded=Counter(graded))

    assert _traces_to_start(run({}, {}), cap=512) == 150  # a prior of half and half: 100 needed
    assert _traces_to_start(run({}, {}, keep_all=True), cap=512) == 512
    rare = run({"correct": 2, "incorrect": 50}, {"correct": 2, "incorrect": 98})  # 2% correct: 48 more need ~1,600
    assert _traces_to_start(rare, cap=512) == 512
    assert _traces_to_start(run({"correct": 49, "incorrect": 50}, {"correct": 49, "incorrect": 51}), cap=512) == 8
