"""The steering hook on a tiny model: the residual leaving the stated layer differs by exactly the shift at the
generated positions and nowhere else; ablation leaves no component along the direction; bad specs are refused."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import teacher_forced_states
from tribunal.errors import TribunalError
from tribunal.traces.intervention import Intervention, InterventionSpec
from tribunal.traces.models import decoder_blocks

PROMPT = 5
TOKENS = [3, 17, 42, 8, 99, 5, 61, 7, 23, 11, 4]  # 5 prompt tokens, then 6 "generated" ones
LAYER = 1


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def states(model, spec=None):
    blocks = decoder_blocks(model)
    hook = Intervention(blocks, spec) if spec is not None else None
    if hook is not None:
        hook.leave_prompt(PROMPT)
    try:
        return teacher_forced_states(model, blocks, TOKENS, range(len(blocks)))
    finally:
        if hook is not None:
            hook.remove()


def test_an_added_vector_moves_the_stated_layer_at_generated_positions_only(model):
    d = model.config.hidden_size
    shift = np.random.default_rng(0).normal(size=d) * 3.0
    plain, steered = states(model), states(model, InterventionSpec("add", LAYER, tuple(shift)))
    for layer in range(LAYER):  # below the layer: untouched
        assert np.array_equal(plain[layer], steered[layer])
    diff = steered[LAYER] - plain[LAYER]
    assert np.array_equal(diff[:PROMPT], np.zeros((PROMPT, d)))  # the prompt is left as it is
    np.testing.assert_allclose(diff[PROMPT:], np.broadcast_to(shift, diff[PROMPT:].shape), rtol=0, atol=1e-5)
    above = max(plain)
    assert np.array_equal(plain[above][:PROMPT], steered[above][:PROMPT])  # causal: the prompt never sees it
    assert not np.allclose(plain[above][PROMPT:], steered[above][PROMPT:])  # the layers above compute from it
    again = states(model)  # removed, the hook leaves the model as it was
    assert all(np.array_equal(plain[k], again[k]) for k in plain)


def test_a_zero_shift_changes_nothing_bit_for_bit(model):
    zero = tuple([-0.0] * model.config.hidden_size)
    plain, steered = states(model), states(model, InterventionSpec("add", LAYER, zero))
    assert all(np.array_equal(plain[k].view(np.uint32), steered[k].view(np.uint32)) for k in plain)


def test_ablation_projects_the_direction_out_of_generated_positions(model):
    d = model.config.hidden_size
    u = np.random.default_rng(1).normal(size=d)
    plain, ablated = states(model), states(model, InterventionSpec("ablate", LAYER, tuple(u * 7.0)))  # any norm
    unit = u / np.linalg.norm(u)
    assert np.abs(ablated[LAYER][PROMPT:] @ unit).max() < 1e-5
    assert np.abs(plain[LAYER][PROMPT:] @ unit).max() > 1e-2
    assert np.array_equal(plain[LAYER][:PROMPT], ablated[LAYER][:PROMPT])
    np.testing.assert_allclose(ablated[LAYER][PROMPT:],
                               plain[LAYER][PROMPT:] - np.outer(plain[LAYER][PROMPT:] @ unit, unit), atol=1e-5)


def test_bad_specs_are_refused(model):
    blocks = decoder_blocks(model)
    with pytest.raises(TribunalError, match="outside the model's 4 layers"):
        Intervention(blocks, InterventionSpec("add", 9, (0.0,) * model.config.hidden_size))
    with pytest.raises(TribunalError, match="kind 'scale'"):
        InterventionSpec.from_settings({"kind": "scale", "layer": 1, "vector": [0.0]})
    hook = Intervention(blocks, InterventionSpec("add", LAYER, (1.0, 2.0)))
    try:
        with pytest.raises(TribunalError, match="2 dimensions"):
            states(model)
    finally:
        hook.remove()
