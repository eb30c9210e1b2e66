"""Shared helpers: deterministic trace records, so a test can recompute what a store must hold."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(__file__).resolve().parent / "data" / "gsm8k"  # 200 rows of each split (tests/data/gsm8k/README.md)


# In the style of DeepSeek-R1-Distill-Qwen's tokenizer_config.json: the generation prompt ends with <think>\n.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<\uff5cUser\uff5c>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<\uff5cAssistant\uff5c>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<\uff5cAssistant\uff5c><think>\\n' }}{% endif %}"
)


def make_record(index: int, layers=(2, 5), d_model: int = 16, tokens=None, prompt: int = 4, label=None):
    """Trace `index` of a deterministic stream: problem index // 3, sample index % 3."""
    from tribunal.store import TraceRecord

    rng = np.random.default_rng(index)
    n = tokens or int(rng.integers(prompt + 1, prompt + 40))
    labels = ("correct", "incorrect", "unparsed")
    return TraceRecord(
        problem_id=index // 3,
        sample_index=index % 3,
        token_ids=rng.integers(0, 500, n),
        prompt_length=prompt,
        activations=rng.standard_normal((len(layers), n, d_model)).astype(np.float32),
        label=label or labels[index % 3],
        text=f"trace {index} \u00e9 #### {index}",
        predicted=str(index),
        gold=str(index),
        finish_reason="stop",
        logprobs=-rng.random(n - prompt),
        entropies=rng.random(n - prompt),
        seed=index,
    )


def writer_kwargs(layers=(2, 5), d_model=16, dtype="float16", **extra):
    return dict(model_id="test/model", layers=layers, d_model=d_model, dtype=dtype, chunk_tokens=32, **extra)


def teacher_forced_states(model, blocks, token_ids, layers) -> dict:
    """{layer: (tokens, d_model) float32 array}: each target block's output from one forward over
    token_ids, the reference every stored activation is checked against."""
    import torch

    seen = {}
    hooks = [blocks[layer].register_forward_hook(
        lambda m, a, o, layer=layer: seen.__setitem__(layer, (o[0] if isinstance(o, tuple) else o)[0].float().numpy()))
        for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[int(t) for t in token_ids]]))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.fixture
def good_store(tmp_path):
    """A small, valid store of six deterministic traces (make_record 0..5)."""
    from tribunal.store import StoreWriter

    path = tmp_path / "good.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(i) for i in range(6)])
    return path


def synth_store(path, **settings):
    """A synthetic store with a planted truth (tribunal synth), without a progress bar."""
    from tribunal.traces.synthetic import SynthSettings, write_synthetic_store

    write_synthetic_store(path, SynthSettings(**settings), progress=False)
    return path


def probe_store(path, **settings):
    """A synthetic store shaped for the probe tests: 400 traces of 100 problems, layers 2 and 4, d_model 24, a planted
    signal of AUROC 0.8 (each setting can be overridden)."""
    return synth_store(path, **{**dict(traces=400, problems=100, layers=(2, 4), d_model=24, tokens_per_trace=(40, 120),
                                       signal=0.8), **settings})


def planted_direction(path):
    """The direction synth planted in a store, and synth's settings as the store records them."""
    import json

    from tribunal.store import open_store

    with open_store(path) as store:
        settings = store.attrs["synth"]
        return store.shards[0].file["synth/direction"][:], json.loads(settings) if isinstance(settings, str) else settings


@pytest.fixture
def python_env():
    """Environment for subprocesses that import tribunal from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with the embedded model's real tokenizer, saved in Hugging Face format."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tribunal.traces.models import EMBEDDED_MODEL

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_problems(tmp_path_factory):
    """40 synthetic problems as a local .jsonl dataset."""
    import json

    from tribunal.problems.synthetic import make_problems

    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    with open(path, "w") as fh:
        for p in make_problems(40, seed=7):
            fh.write(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n")
    return path


def pytest_collection_modifyitems(items):
    """The vLLM engine's tests run last (a stable sort keeps every other order): the in-process vLLM engine they
    start is kept for reuse by later runs in this process, with what vLLM sets up around it, and must not reach
    other tests."""
    traces = Path(__file__).parent / "traces"
    vllm_tests = (traces / "test_vllm_engine.py", traces / "engines" / "test_vllm.py",
                  traces / "engines" / "test_vllm_inline.py")
    items.sort(key=lambda item: item.path in vllm_tests)
