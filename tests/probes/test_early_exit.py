"""Early exit on a hand-built case whose numbers can be checked by hand, and the nested threshold choice."""

import numpy as np
import pytest

from tribunal.probes import early_exit as ee

# trace 0: chunks at 10 tokens (wrong, p .3) and 20 (right, p .9); full trace 50 tokens, right
# trace 1: one chunk at 5 tokens (right, p .8); full 40, right
# trace 2: chunks at 30 (wrong, p .95) and 35 (right, p .2); full 60, wrong
CASE = ee.ExitCase(chunk_trace=np.array([0, 0, 1, 2, 2]), chunk_tokens=np.array([10, 20, 5, 30, 35.0]),
                   chunk_correct=np.array([0, 1, 1, 0, 1]), trace_correct=np.array([1, 1, 0]),
                   trace_tokens=np.array([50, 40, 60.0]), trace_group=np.array([0, 1, 2]))
SCORE = np.array([0.3, 0.9, 0.8, 0.95, 0.2])


def test_threshold_rule_by_hand():
    correct, tokens = CASE.threshold_rule(SCORE, 0.85)  # t0 stops at its 2nd chunk, t1 runs on, t2 stops at once
    assert correct.tolist() == [True, True, False] and tokens.tolist() == [20, 40, 30]
    s = ee.summary(correct, tokens, CASE.trace_tokens)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["tokens_saved"] == pytest.approx(1 - 90 / 150)
    correct, tokens = CASE.threshold_rule(SCORE, 0.5)
    assert correct.tolist() == [True, True, False] and tokens.tolist() == [20, 5, 30]
    correct, tokens = CASE.threshold_rule(SCORE, 0.99)  # nobody exits: the full traces
    assert correct.tolist() == [True, True, False] and tokens.tolist() == [50, 40, 60]


def test_baseline_rules_by_hand():
    correct, tokens = CASE.first_answer_rule()
    assert correct.tolist() == [False, True, False] and tokens.tolist() == [10, 5, 30]
    correct, tokens = CASE.fraction_rule(0.5)  # budgets 25, 20, 30 tokens
    assert correct.tolist() == [True, True, False] and tokens.tolist() == [25, 20, 30]
    correct, tokens = CASE.fraction_rule(0.1)  # budgets 5, 4, 6: only trace 0... has no chunk by 5; t1 has one at 5
    assert correct.tolist() == [False, False, False] and tokens.tolist() == [5, 4, 6]


def test_threshold_choice_saves_most_within_the_margin():
    # full accuracy 2/3; every tau in (0.3, 0.8] keeps it and saves 1 - 55/150, the most: the highest such is chosen
    assert ee.choose_threshold(CASE, SCORE, margin=0.0) == 0.8
    strict = ee.ExitCase(CASE.chunk_trace, CASE.chunk_tokens, np.array([0, 0, 0, 0, 0]), np.array([1, 1, 1]),
                         CASE.trace_tokens, CASE.trace_group)
    assert ee.choose_threshold(strict, SCORE, margin=0.0) == float("inf")  # every exit loses accuracy


def test_nested_choice_never_sees_its_test_problems():
    rng = np.random.default_rng(0)
    n = 40
    chunk_trace = np.repeat(np.arange(n), 3)
    case = ee.ExitCase(chunk_trace, np.tile([10, 20, 30.0], n), rng.integers(0, 2, 3 * n), rng.integers(0, 2, n),
                       np.full(n, 40.0), np.arange(n) // 2)
    score = rng.random(3 * n)
    folds = [(np.flatnonzero(case.trace_group % 4 != k), np.flatnonzero(case.trace_group % 4 == k)) for k in range(4)]
    seen = []

    def choose(train_case, k):
        seen.append(set(train_case.trace_group.tolist()))
        train_chunks = np.isin(chunk_trace, folds[k][0])
        return ee.choose_threshold(train_case, score[train_chunks])

    def apply(tau, test):
        correct, tokens = case.threshold_rule(score, tau)
        return correct[test], tokens[test]

    correct, tokens, chosen = ee.nested_outcome(case, folds, choose, apply)
    for k, (_, test) in enumerate(folds):
        assert not seen[k] & set(case.trace_group[test].tolist())
    assert len(chosen) == 4 and correct.shape == (n,) and np.all(tokens > 0)
    s = ee.interval_summary(correct, tokens, case.trace_tokens, case.trace_correct, case.trace_group)
    assert s["tokens_saved_ci"][0] <= s["tokens_saved"] <= s["tokens_saved_ci"][1]
