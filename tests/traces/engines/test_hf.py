"""The hf engine (tribunal.traces.engines.hf): its decode loop captures every token's states, runs the last forward
only as deep and as wide as it must, halves its batch on an out-of-memory, and keeps host memory within
--capture-memory."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import teacher_forced_states
from tribunal.store import open_store
from tribunal.traces.capture.hooks import BlockCapture
from tribunal.traces.engines.hf import SamplingSettings, sample_batch
from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.intervention import Intervention, InterventionSpec
from tribunal.traces.models import decoder_blocks, load_model


def test_last_token_is_captured_without_running_the_blocks_above(tiny_model):
    """The forward that captures the last sampled token stops at the deepest target layer."""
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


def test_an_intervention_moves_generated_positions_of_every_trace_of_a_left_padded_batch(tiny_model):
    """The decode loop tells the steering hook where the (left-padded) prompts end: every trace's stored states
    equal a teacher-forced pass under the same intervention, which differs from a plain pass by exactly the shift
    at the intervened layer's generated positions."""
    model, tok = load_model(str(tiny_model))
    blocks = decoder_blocks(model)
    shift = np.random.default_rng(2).normal(size=model.config.hidden_size) * 2.0
    spec = InterventionSpec("add", 1, tuple(shift))
    steering, capture = Intervention(blocks, spec), BlockCapture(blocks, [1, 2])
    prompts = [tok(q)["input_ids"] for q in ("Tom has 3 apples.", "Ann buys 12 pens and 4 books today.", "5 + 7 =")]
    try:
        traces = sample_batch(model, capture, prompts, [1, 2, 3], SamplingSettings(1.0, 1.0, 12), {tok.eos_token_id},
                              tok.pad_token_id, store_dtype="float32", intervention=steering)
    finally:
        capture.remove()
        steering.remove()
    for t in traces:
        ids, n = t.prompt_ids + t.generated_ids, len(t.prompt_ids)
        plain = teacher_forced_states(model, blocks, ids, (1, 2))
        again = Intervention(blocks, spec)
        again.leave_prompt(n)
        try:
            steered = teacher_forced_states(model, blocks, ids, (1, 2))
        finally:
            again.remove()
        for i, layer in enumerate((1, 2)):
            np.testing.assert_allclose(t.activations[i], steered[layer], atol=1e-4, rtol=1e-4)
        diff = t.activations[0] - plain[1]
        np.testing.assert_allclose(diff[:n], 0, atol=1e-4)
        np.testing.assert_allclose(diff[n:], np.broadcast_to(shift, diff[n:].shape), atol=1e-4)


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
            s = run_generation(GenerateConfig(out=str(tmp_path / "g.h5"), model=str(tiny_model),
                                              dataset=str(small_problems), layers="1,3", max_new_tokens=24,
                                              samples_per_problem=2, batch_size=8, max_problems=6, keep_all=True,
                                              progress=False))
    finally:
        models.load_model = real_load
    assert s["traces"] == 12
    assert "halving the batch to 4" in caplog.text and "halving the batch to 2" in caplog.text


CAPTURE_PEAK = """
import json, sys
from pathlib import Path
from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.intervention import Intervention, InterventionSpec
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
        for i in range(a.n_traces):  # per-trace seeds: smaller batches sample the same traces
            np.testing.assert_array_equal(a.trace(i).token_ids, b.trace(i).token_ids)
