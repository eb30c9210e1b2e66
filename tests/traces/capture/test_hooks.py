"""Hook capture (tribunal.traces.capture.hooks): the capture buffer reused from batch to batch, the budget that
refuses what it cannot hold, and the one conversion of captured states into the store's words."""

import numpy as np
import pytest
import torch

from conftest import teacher_forced_states
from tribunal.errors import TribunalError
from tribunal.store.format import DTYPES, decode_activations, encode_activations
from tribunal.traces.capture.hooks import BlockCapture, host_words
from tribunal.traces.engines.hf import SamplingSettings, sample_batch
from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.models import decoder_blocks, load_model


def test_host_words_are_the_words_the_store_keeps():
    """torch's conversion and the store's numpy one give the same words (bfloat16 rounded to nearest even, kept as
    16-bit words); host states already in the store's dtype are not copied."""
    states = torch.randn(2, 5, 8, dtype=torch.float32) * 100
    for dtype in ("float16", "bfloat16", "float32"):
        words = host_words(states, dtype)
        assert words.dtype == DTYPES[dtype][0] and words.shape == (2, 5, 8)
        np.testing.assert_array_equal(words, encode_activations(states.numpy(), dtype))
    bf16 = host_words(states, "bfloat16")
    np.testing.assert_array_equal(decode_activations(bf16, "bfloat16"), states.to(torch.bfloat16).float().numpy())
    stored = states.to(torch.bfloat16)
    assert np.shares_memory(host_words(stored, "bfloat16"), stored.view(torch.int16).numpy())
    assert np.shares_memory(host_words(states, "float32"), states.numpy())


def test_a_batch_keeps_its_activations_when_the_capture_buffer_is_reused(tiny_model):
    """The capture buffer lives from batch to batch (growing when one needs more): what a batch
    returned must not change when the next batch overwrites the buffer."""
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


def test_a_budget_that_holds_no_trace_is_refused_clearly(tmp_path, tiny_model, small_problems):
    with pytest.raises(TribunalError, match="--capture-memory 1M holds no trace.*raise --capture-memory"):
        run_generation(GenerateConfig(out=str(tmp_path / "s.h5"), model=str(tiny_model), dataset=str(small_problems),
                                      layers="all", max_new_tokens=5000, capture_memory="1M", progress=False))
