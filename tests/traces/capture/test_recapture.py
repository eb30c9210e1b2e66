"""`tribunal capture` (tribunal.traces.capture.recapture): teacher-forced re-capture of a store's traces reproduces the generator's activations,
log-probs and entropies, adds layers without resampling, and refuses a model that is not the store's."""

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.capture.recapture import recapture_store
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
    result = recapture_store(hf_store, out, model=str(tiny_model), progress=False)
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
    again = recapture_store(hf_store, out, model=str(tiny_model), layers="all", progress=False)
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


def test_capture_memory_must_be_a_size(hf_store, tmp_path):
    bad = CliRunner().invoke(main, ["capture", str(hf_store), "--out", str(tmp_path / "x.h5"), "--capture-memory", "lots"])
    assert bad.exit_code == 2 and "not a size like 512M or 8G" in bad.output and not (tmp_path / "x.h5").exists()


def test_a_steered_store_is_not_recaptured(tmp_path, tiny_model):
    """Teacher forcing without the intervention would store states the traces were not sampled from."""
    from conftest import make_record, writer_kwargs
    from tribunal.errors import TribunalError
    from tribunal.store import StoreWriter

    src = tmp_path / "arm.h5"
    with StoreWriter(src, **writer_kwargs(generation_settings={"intervention": {"kind": "ablate", "layer": 1}})) as w:
        w.append([make_record(0)])
    with pytest.raises(TribunalError, match="under an intervention"):
        recapture_store(src, tmp_path / "re.h5", model=str(tiny_model), progress=False)
    assert not (tmp_path / "re.h5").exists()
