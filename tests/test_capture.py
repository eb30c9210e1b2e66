"""tribunal capture: teacher-forced re-capture of a store's traces reproduces the generator's activations,
log-probs and entropies, adds layers without resampling, and refuses a model that is not the store's."""

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.capture import capture_store
from tribunal.traces.generate import GenerateConfig, run_generation


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory, tiny_model, small_problems):
    out = tmp_path_factory.mktemp("hf") / "hf.h5"
    run_generation(GenerateConfig(out=str(out), model=str(tiny_model), dataset=str(small_problems), layers="1,3",
                                  max_new_tokens=24, samples_per_problem=2, batch_size=4, max_problems=6, keep_all=True,
                                  dtype="float32", progress=False))
    return out


def test_capture_reproduces_the_generators_store(hf_store, tiny_model, tmp_path):
    out = tmp_path / "re.h5"
    result = capture_store(hf_store, out, model=str(tiny_model), progress=False)
    assert result["status"] == "done"
    with open_store(hf_store) as a, open_store(out) as b:
        assert b.n_traces == a.n_traces and list(b.layers) == [1, 3] and verify_store(b) == []
        for i in range(a.n_traces):
            ta, tb = a.trace(i), b.trace(i)
            np.testing.assert_array_equal(ta.token_ids, tb.token_ids)
            assert (ta.label, ta.text, ta.predicted, ta.finish_reason) == (tb.label, tb.text, tb.predicted, tb.finish_reason)
            for layer in (1, 3):
                np.testing.assert_allclose(b.activations(layer, i), a.activations(layer, i), atol=1e-4, rtol=1e-4)
            gen = ta.is_generated
            np.testing.assert_allclose(tb.logprobs[gen], ta.logprobs[gen], atol=1e-3)
            np.testing.assert_allclose(tb.entropies[gen], ta.entropies[gen], atol=1e-3)


def test_capture_adds_layers_and_resumes(hf_store, tiny_model, tmp_path):
    out = tmp_path / "all.h5"
    r = CliRunner().invoke(main, ["capture", str(hf_store), "--out", str(out), "--layers", "all", "--model",
                                  str(tiny_model), "--quiet"])
    assert r.exit_code == 0, r.output
    again = capture_store(hf_store, out, model=str(tiny_model), layers="all", progress=False)
    assert again["traces"] == 12  # nothing stored twice
    with open_store(hf_store) as a, open_store(out) as b:
        assert list(b.layers) == [0, 1, 2, 3] and b.n_traces == a.n_traces
        np.testing.assert_allclose(b.activations(3, 5), a.activations(3, 5), atol=1e-4, rtol=1e-4)


def test_capture_refuses_another_model(hf_store, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)
    r = CliRunner().invoke(main, ["capture", str(hf_store), "--out", str(tmp_path / "x.h5"), "--model", str(other)])
    assert r.exit_code == 1 and "the model is not the store's (model_revision: store has 'local:" in r.output, r.output
    assert not (tmp_path / "x.h5").exists()


def test_teacher_forcing_halves_its_token_budget_on_out_of_memory(hf_store, tiny_model, caplog):
    """No GPU here: a real torch.OutOfMemoryError from the model while a forward batch holds over 2 traces;
    the budget halves until batches fit, and every trace comes back, in order, as an unhindered forward gives it."""
    import torch

    from tribunal.traces.models import decoder_blocks, load_model
    from tribunal.traces.teacher_forcing import TeacherForcer

    net, _ = load_model(str(tiny_model), compute_dtype="float32")
    with open_store(hf_store) as store:
        sequences = [(store.trace(i).token_ids, store.trace(i).prompt_length) for i in range(store.n_traces)]
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
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b.activations, a.activations, atol=1e-5)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)


def test_capture_memory_is_a_size_or_auto(hf_store, tiny_model, tmp_path):
    """auto sizes the forward batch to the device (2G on a CPU); a size fixes it; anything else is refused."""
    from tribunal.traces.models import load_model
    from tribunal.traces.teacher_forcing import forcer_for, tokens_per_batch

    net, _ = load_model(str(tiny_model), compute_dtype="float32")
    auto = forcer_for(net, [1, 3], 1.0, "float16", None)
    fixed = forcer_for(net, [1, 3], 1.0, "float16", 1 << 20)
    for forcer in (auto, fixed):
        forcer.remove()
    assert auto.budget_tokens == tokens_per_batch(2 << 30, 2, net.config, 4, 2)
    assert fixed.budget_tokens == tokens_per_batch(1 << 20, 2, net.config, 4, 2) < auto.budget_tokens
    bad = CliRunner().invoke(main, ["capture", str(hf_store), "--out", str(tmp_path / "x.h5"), "--capture-memory", "lots"])
    assert bad.exit_code == 2 and "not a size like 512M or 8G" in bad.output and not (tmp_path / "x.h5").exists()
