"""The hf engine's CUDA paths, on a real GPU: the pinned asynchronous copy, accelerate's device_map
with offload, and a real CUDA out-of-memory. Skipped where torch sees no GPU (CI has none); run
`python -m pytest tests/traces/engines/test_hf_cuda.py` on a GPU node."""

import json

import numpy as np
import pytest
import torch

from conftest import teacher_forced_states
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.generate import GenerateConfig, run_generation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU and torch's CUDA build (torch.cuda.is_available() is False here)")


def generate(tmp_path, model, problems, name, **kw):
    base = dict(out=str(tmp_path / name), model=str(model), dataset=str(problems), layers="1,3", max_new_tokens=24,
                samples_per_problem=2, batch_size=4, max_problems=6, keep_all=True, progress=False)
    base.update(kw)
    return run_generation(GenerateConfig(**base))


def assert_matches_teacher_forcing(store_path, model_path, atol):
    """Every stored trace's states equal a float32 forward of the same model over its tokens, on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with open_store(store_path) as store:
        assert verify_store(store) == []
        for i in range(store.n_traces):
            seen = teacher_forced_states(model, model.model.layers, store.trace(i).token_ids, store.layers)
            for layer in store.layers:
                np.testing.assert_allclose(store.activations(layer, i), seen[layer], atol=atol, rtol=atol)


def test_gpu_generation_equals_a_teacher_forced_pass(tmp_path, tiny_model, small_problems):
    """Default device (the GPU), float32 compute: the pinned asynchronous copy hands the store whole batches."""
    summary = generate(tmp_path, tiny_model, small_problems, "gpu.h5", compute_dtype="float32", dtype="float32")
    assert summary["status"] == "done" and summary["traces"] == 12
    assert_matches_teacher_forcing(tmp_path / "gpu.h5", tiny_model, atol=2e-3)


def test_device_map_auto_and_offload(tmp_path, tiny_model, small_problems):
    """accelerate's dispatch (its own hooks beside ours): device_map "auto", and a map that offloads the
    upper blocks to the CPU (weights there, run on the GPU)."""
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for name, device_map in (("auto.h5", "auto"), ("split.h5", json.dumps(split))):
        summary = generate(tmp_path, tiny_model, small_problems, name, device_map=device_map,
                           compute_dtype="float32", dtype="float32")
        assert summary["traces"] == 12
        assert_matches_teacher_forcing(tmp_path / name, tiny_model, atol=2e-3)


def test_real_cuda_out_of_memory_halves_the_batch(tmp_path, small_problems, caplog):
    """The caching allocator capped (set_per_process_memory_fraction) at the model plus room for a few
    rows: batch 16 raises a real torch.OutOfMemoryError, the generator halves the batch until it fits."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tribunal.traces.capture.hooks import BlockCapture
    from tribunal.traces.engines.hf import SamplingSettings, sample_batch
    from tribunal.traces.models import EMBEDDED_MODEL, load_model

    path = tmp_path / "wide-llama"
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    settings = SamplingSettings(1.0, 1.0, 512)

    # What one row of a batch costs on this GPU, from a 2-row batch.
    model, tok = load_model(str(path), compute_dtype="float32")
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    capture = BlockCapture(model.model.layers, [1, 3])
    prompt = tok("Tom has 3 apples and buys 5 more. How many apples does he have?")["input_ids"]
    sample_batch(model, capture, [prompt] * 2, [1, 2], settings, set(), tok.pad_token_id)
    per_row = (torch.cuda.max_memory_allocated() - weights) / 2
    capture.remove()
    del model, capture
    torch.cuda.empty_cache()

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((weights + 6 * per_row) / total)
    try:
        with caplog.at_level("WARNING"):
            summary = generate(tmp_path, path, small_problems, "oom.h5", layers="1,3", compute_dtype="float32",
                               max_new_tokens=512, batch_size=16, samples_per_problem=4, max_problems=4)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert summary["traces"] == 16
    assert "halving the batch to 8" in caplog.text and "halving the batch to 4" in caplog.text
    with open_store(tmp_path / "oom.h5") as store:
        assert verify_store(store) == []
