"""Teacher forcing (tribunal.traces.capture.teacher_forcing): one forward gives every position's states and the
sampled tokens' log-probs; an out-of-memory halves the token budget without changing what comes back; the budget
is a size or sized to the device."""

import numpy as np
import torch

from tribunal.traces.capture.teacher_forcing import TeacherForcer, forcer_for, tokens_per_batch
from tribunal.traces.models import decoder_blocks, load_model


def sequences_of(vocab: int, n: int = 10, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """n token sequences of 6 to 40 ids, the first 4 of each the prompt."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, int(rng.integers(6, 40))), 4) for _ in range(n)]


def test_teacher_forcing_halves_its_token_budget_on_out_of_memory(tiny_model, caplog):
    """No GPU here: a real torch.OutOfMemoryError from the model while a forward batch holds over 2 traces;
    the budget halves until batches fit, and every trace comes back, in order, as an unhindered forward gives it."""
    net, _ = load_model(str(tiny_model), compute_dtype="float32")
    sequences = sequences_of(net.config.vocab_size)
    roomy = TeacherForcer(net, decoder_blocks(net), [1, 3], 1.0, "float32", budget_tokens=10**6)
    expected = roomy.forward(sequences)
    roomy.remove()

    def too_big(module, inputs):
        if inputs[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected: a batch above 2 traces)")

    guard = net.model.layers[0].register_forward_pre_hook(too_big)
    tight = TeacherForcer(net, decoder_blocks(net), [1, 3], 1.0, "float32", budget_tokens=10**6)
    with caplog.at_level("WARNING"):
        got = tight.forward(sequences)
    guard.remove()
    tight.remove()
    assert "halving its token budget" in caplog.text and tight.budget_tokens < 10**6
    for (ids, prompt), a, b in zip(sequences, expected, got):
        assert b.activations.shape == (2, len(ids), net.config.hidden_size) and len(b.logprobs) == len(ids) - prompt
        np.testing.assert_allclose(b.activations, a.activations, atol=1e-5)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)


def test_capture_memory_is_a_size_or_auto(tiny_model):
    """auto sizes the forward batch to the device (2G on a CPU); a size fixes it."""
    net, _ = load_model(str(tiny_model), compute_dtype="float32")
    auto = forcer_for(net, [1, 3], 1.0, "float16", None)
    fixed = forcer_for(net, [1, 3], 1.0, "float16", 1 << 20)
    for forcer in (auto, fixed):
        forcer.remove()
    assert auto.budget_tokens == tokens_per_batch(2 << 30, 2, net.config, 4, 2)
    assert fixed.budget_tokens == tokens_per_batch(1 << 20, 2, net.config, 4, 2) < auto.budget_tokens
