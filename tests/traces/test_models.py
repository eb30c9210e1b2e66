"""tribunal.traces.models: decoder blocks and layer indices across model families (tiny random models built from
configs), and the tokenizers that decode a store's tokens."""

import json

import pytest
import transformers

from tribunal.errors import TribunalError
from tribunal.traces.models import (EMBEDDED_MODEL, EMBEDDED_MODEL_ID, decoder_blocks, default_layers, piece_decoder,
                                    resolve_layers, token_decoder)
from tribunal.traces.synthetic import SYNTH_MODEL_ID

SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3,
             max_position_embeddings=64)

FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {"num_key_value_heads": 2}),
    "mistral": (transformers.MistralConfig, {"num_key_value_heads": 2}),
    "gemma": (transformers.GemmaConfig, {"head_dim": 16, "num_key_value_heads": 2}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "gpt2": (transformers.GPT2Config, {"n_embd": 32, "n_layer": 3, "n_head": 2, "n_positions": 64}),
    "gpt_neox": (transformers.GPTNeoXConfig, {}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_blocks_of_each_family(family):
    import torch

    config_cls, extra = FAMILIES[family]
    kwargs = {**SMALL, **extra}
    if family == "gpt2":
        kwargs = {"vocab_size": 64, **extra}
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs))
    blocks = decoder_blocks(model)
    assert len(blocks) == 3
    # the hook output of block i is the residual stream that hidden_states[i + 1] reports (before any final norm)
    seen = {}
    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i in range(3)]
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True)
    for h in handles:
        h.remove()
    for i in range(2):  # the last entry of hidden_states has the final norm applied in some families
        torch.testing.assert_close(seen[i], out.hidden_states[i + 1])


def test_layer_specs():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("1,3", 4) == [1, 3]
    assert resolve_layers("0-2", 4) == [0, 1, 2]
    assert resolve_layers(None, 28) == [12, 16, 20] == default_layers(28)
    assert resolve_layers(None, 8) == default_layers(8)
    with pytest.raises(TribunalError, match=r"out of range: the model has 4 decoder layers \(0..3\)"):
        resolve_layers("2,4", 4)
    with pytest.raises(TribunalError, match="comma list"):
        resolve_layers("a,b", 4)


def test_token_decoder_uses_the_stores_tokenizer_and_never_the_network_unasked(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    ids = tok("Tom has 3 apples.")["input_ids"]
    for decode in (token_decoder(EMBEDDED_MODEL_ID), token_decoder(str(tiny_model)),
                   token_decoder("org/a-hub-model", tokenizer=str(EMBEDDED_MODEL))):
        assert [decode(i) for i in ids] == [tok.decode([i]) for i in ids] == piece_decoder(EMBEDDED_MODEL_ID)(ids)
    assert token_decoder("org/a-hub-model") is None  # a hub id: no lookup unless a tokenizer is given
    assert token_decoder(SYNTH_MODEL_ID)(ord("x")) == "x"
    with pytest.raises(TribunalError, match="cannot load tokenizer '/nonexistent/tok'"):
        token_decoder(EMBEDDED_MODEL_ID, tokenizer="/nonexistent/tok")
    with pytest.raises(TribunalError, match="not on this machine: give its tokenizer with --tokenizer"):
        piece_decoder("org/a-hub-model")


def test_keep_loaded_loads_a_model_once_and_again_when_its_files_change(tmp_path, tiny_model):
    """steer's arms share one load; a model whose files changed on disk is loaded afresh, and outside the block
    every load is new."""
    import shutil

    from tribunal.traces.models import keep_loaded, load_model

    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    with keep_loaded():
        first, tok = load_model(str(copy))
        assert load_model(str(copy))[0] is first
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
        changed = load_model(str(copy))[0]
        assert changed is not first and changed.config.rms_norm_eps == 1e-5
    assert load_model(str(copy))[0] is not changed


def test_a_model_without_weights_has_the_structure_dtype_stop_tokens_and_identity_of_the_real_one():
    """What --capture inline loads (vLLM holds the weights): nothing on a device, everything a run reads."""
    from tribunal.traces.models import decoder_blocks, load_model, model_identity

    bare, tokenizer = load_model(None, weights=False)
    real, _ = load_model(None)
    assert {p.device.type for p in bare.parameters()} == {"meta"}
    assert bare.dtype == real.dtype and len(decoder_blocks(bare)) == len(decoder_blocks(real))
    assert bare.config.to_dict() == real.config.to_dict()
    assert bare.generation_config.eos_token_id == real.generation_config.eos_token_id
    assert model_identity(bare, None) == model_identity(real, None) and tokenizer.eos_token_id is not None
