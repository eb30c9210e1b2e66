"""Exit thresholds: the accepted specs, where `auto` and `conformal:` read from, and the conformal guarantee in a
simulation (fixed seeds): over many calibration draws, the share whose threshold's true risk (on a large fresh
population) exceeds EPS stays within DELTA, while certifying on the empirical risk alone breaks it."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import binom

from tribunal.errors import TribunalError
from tribunal.probes import early_exit as ee
from tribunal.probes import exit_policy as xp


@pytest.mark.parametrize("spec, kind, fields", [
    ("0.8", "number", {"value": 0.8}), ("0", "number", {"value": 0.0}), ("1", "number", {"value": 1.0}),
    ("auto", "auto", {}), ("conformal:0.05", "conformal", {"epsilon": 0.05, "delta": 0.1}),
    ("conformal:0.05:0.2", "conformal", {"epsilon": 0.05, "delta": 0.2}),
])
def test_accepted_specs(spec, kind, fields):
    parsed = xp.parse_threshold(spec)
    assert parsed.kind == kind and all(getattr(parsed, k) == v for k, v in fields.items())


@pytest.mark.parametrize("spec", ["1.5", "-0.1", "nan", "high", "conformal:", "conformal:0", "conformal:1.2",
                                  "conformal:0.1:0", "conformal:0.1:0.1:3", "conformal:x", "Auto"])
def test_bad_specs_say_the_accepted_forms(spec):
    with pytest.raises(TribunalError) as err:
        xp.parse_threshold(spec)
    message = str(err.value)
    assert "\n" not in message and "`auto`" in message and "conformal:EPS:DELTA" in message
    if spec in ("1.5", "-0.1"):
        assert "outside [0, 1]" in message


def test_p_values_by_hand():
    assert xp.p_value(np.zeros(20), 0.1) == pytest.approx(0.9 ** 20)  # binary losses: the exact binomial tail
    assert xp.p_value([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0.1) == pytest.approx(binom.cdf(1, 10, 0.1))
    halves = np.r_[np.full(10, 0.5), np.zeros(190)]  # mean 0.025 < 0.05: Hoeffding-Bentkus
    hb = math.e * binom.cdf(5, 200, 0.05)
    a = 0.025
    hoeffding = math.exp(-200 * (a * math.log(a / 0.05) + (1 - a) * math.log((1 - a) / 0.95)))
    assert xp.p_value(halves, 0.05) == pytest.approx(min(hb, hoeffding))
    assert xp.p_value(np.full(50, 0.5), 0.05) == 1.0  # risk above epsilon: nothing to reject


def population(rng, problems: int, traces: int = 4):
    """Problems of varied difficulty; each trace has 2-6 chunks, its last chunk's answer the trace's, earlier ones
    more often right later in a trace that ends right; the score knows the chunk's correctness through noise and a
    per-problem offset (so traces of one problem are alike: the units are problems)."""
    p = rng.beta(2, 2, problems)
    group = np.repeat(np.arange(problems), traces)
    full = rng.random(len(group)) < p[group]
    k_chunks = rng.integers(2, 7, len(group))
    chunk_trace = np.repeat(np.arange(len(group)), k_chunks)
    k = np.arange(len(chunk_trace)) - np.repeat(np.cumsum(k_chunks) - k_chunks, k_chunks)
    ends_right = full[chunk_trace]
    correct = rng.random(len(chunk_trace)) < np.where(ends_right, 0.35 + 0.6 * (k + 1) / k_chunks[chunk_trace], 0.1)
    last = k == k_chunks[chunk_trace] - 1
    correct[last] = ends_right[last]
    logit = (1.6 * (2 * correct - 1) + rng.normal(0, 0.7, problems)[group][chunk_trace]
             + rng.normal(0, 1.2, len(chunk_trace)) - 0.5)
    case = ee.ExitCase(chunk_trace, 50.0 * (k + 1), correct.astype(int), full.astype(int), 50.0 * k_chunks + 30, group)
    return case, 1 / (1 + np.exp(-logit))


@pytest.mark.parametrize("traces, problems", [(4, 300), (1, 800)])  # per-problem means (Hoeffding-Bentkus); binary
def test_conformal_threshold_meets_its_guarantee(traces, problems):
    rng = np.random.default_rng(traces)
    test, test_score = population(rng, 40000 // traces, traces)
    true = {tau: xp.problem_losses(test, test_score, tau).mean() for tau in xp.GRID}
    saved = {tau: 1 - test.threshold_rule(test_score, tau)[1].sum() / test.trace_tokens.sum() for tau in xp.GRID}
    eps, delta, draws = 0.98 * true[0.4], 0.1, 200  # eps just under a grid point's risk: the hardest case
    certified, naive = [], []
    for _ in range(draws):
        cal, score = population(rng, problems, traces)
        certified.append(xp.conformal_threshold(cal, score, eps, delta)[0])
        chosen = math.inf  # the same fixed sequence, certified by the empirical risk alone
        for tau in xp.GRID:
            if xp.problem_losses(cal, score, tau).mean() > eps:
                break
            chosen = tau
        naive.append(chosen)

    def violations(taus):
        return np.mean([true.get(t, 0.0) > eps for t in taus])

    assert violations(certified) <= delta + 0.03  # Monte-Carlo allowance: 200 draws, sd 0.02 at 0.1
    assert violations(naive) > delta + 0.15  # the check can fail: without the p-value, coverage breaks
    assert np.mean(np.isfinite(certified)) >= 0.95  # not vacuous: it exits, and saves tokens
    assert np.mean([saved.get(t, 0.0) for t in certified]) > 0.3


def test_too_few_problems_never_exit():
    case, score = population(np.random.default_rng(0), 20, 4)
    tau, how = xp.conformal_threshold(case, score, 0.1, 0.1)
    assert tau == math.inf and how["threshold"] is None and how["min_problems"] == 22
    assert len(how["tested"]) == 1 and how["tested"][0]["p"] == pytest.approx(0.9 ** 20)


def data_with_a_silent_trace():
    """Three traces of two problems; trace 11 states no intermediate answer."""
    return SimpleNamespace(trace=np.array([10, 10, 12]), problem=np.array([0, 0, 1]), index=np.array([0, 1, 0]),
                           token_end=np.array([4, 9, 3]), y=np.array([0, 1, 1]), traces=np.array([10, 11, 12]),
                           trace_correct=np.array([True, False, True]), trace_tokens=np.array([20.0, 15, 8]),
                           trace_problem=np.array([0, 0, 1]))


def test_calibration_file_round_trip(tmp_path):
    path = tmp_path / xp.CALIBRATION_FILE
    xp.write_calibration(path, data_with_a_silent_trace(),
                         {"probe": [0.2, 0.9, 0.7], "confidence": np.array([0.5, 0.6, np.nan])})
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(xp.COLUMNS) and lines[3] == "11,0,-1,,,0,15,,"
    case, scores, extra = xp.read_calibration(path)
    assert case.chunk_trace.tolist() == [0, 0, 2] and case.chunk_tokens.tolist() == [5, 10, 4]
    assert case.trace_correct.tolist() == [1, 0, 1] and case.trace_group.tolist() == [0, 0, 1]
    assert scores["probe"].tolist() == [0.2, 0.9, 0.7] and np.isnan(scores["confidence"][2]) and not extra
    # problem 0's two traces share its loss: at 0.1 trace 10 exits wrong (harm), trace 11 never exits
    assert xp.problem_losses(case, scores["probe"], 0.1).tolist() == [0.5, 0.0]
    assert xp.problem_losses(case, scores["confidence"], 0.55).tolist() == [0.0, 0.0]  # a blank never exits


def test_resolve_reads_auto_and_conformal_from_the_probes_folder(tmp_path):
    (tmp_path / xp.DIRECTIONS_FILE).write_text(json.dumps({"chunk": {
        "exit_thresholds": {"probe": 0.85, "confidence": None}, "exit_thresholds_how": {"probe": {"rule": "r"}}}}))
    assert xp.resolve_threshold("auto", tmp_path, "probe") == (0.85, {"spec": "auto", "threshold": 0.85, "rule": "r"})
    tau, how = xp.resolve_threshold("auto", tmp_path, "confidence")
    assert tau == math.inf and how["threshold"] is None
    assert xp.resolve_threshold("0.3", tmp_path, "probe")[0] == 0.3
    with pytest.raises(TribunalError, match="no `auto` threshold for rule 'trial_answer'"):
        xp.resolve_threshold("auto", tmp_path, "trial_answer")
    with pytest.raises(TribunalError, match=r"exit_calibration.csv, written by `tribunal probe chunks`"):
        xp.resolve_threshold("conformal:0.1", tmp_path, "probe")
    case, score = population(np.random.default_rng(3), 200, 1)
    data = SimpleNamespace(trace=case.chunk_trace, problem=case.trace_group[case.chunk_trace],
                           index=np.zeros(len(score), int), token_end=case.chunk_tokens - 1, y=case.chunk_correct,
                           traces=np.arange(len(case.trace_correct)), trace_correct=case.trace_correct,
                           trace_tokens=case.trace_tokens, trace_problem=case.trace_group)
    xp.write_calibration(tmp_path / xp.CALIBRATION_FILE, data, {"probe": score, "confidence": score,
                                                                "trial_answer_correct": np.zeros(len(score))})
    tau, how = xp.resolve_threshold("conformal:0.1:0.2", tmp_path, "probe")
    assert tau == xp.conformal_threshold(case, np.round(score, 6), 0.1, 0.2)[0] < 1 and how["epsilon"] == 0.1
    assert how["exits_graded_by"] == "intermediate answer"
    forced, how = xp.resolve_threshold("conformal:0.1:0.2", tmp_path, "probe", answer="forced")
    assert how["exits_graded_by"] == "trial answer" and forced > tau  # every trial answer wrong: more cautious
    with pytest.raises(TribunalError, match="no 'trial_answer' column"):
        xp.resolve_threshold("conformal:0.1", tmp_path, "trial_answer")


def test_auto_without_exit_thresholds(tmp_path):
    with pytest.raises(TribunalError, match="run `tribunal probe chunks` first"):
        xp.resolve_threshold("auto", tmp_path, "probe")
    (tmp_path / xp.DIRECTIONS_FILE).write_text(json.dumps({"chunk": {"direction": {}}}))
    with pytest.raises(TribunalError, match="run `tribunal probe chunks` first"):
        xp.resolve_threshold("auto", tmp_path, "probe")
    with pytest.raises(TribunalError, match="unknown exit rule"):
        xp.resolve_threshold("auto", tmp_path, "entropy")
