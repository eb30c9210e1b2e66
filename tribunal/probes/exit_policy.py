"""Exit thresholds for early exit while sampling: a number, `auto`, or `conformal:EPS[:DELTA]`.

`auto` is the threshold `tribunal probe chunks` chose on the probing store (doc["chunk"]["exit_thresholds"]);
`conformal:` certifies one on the probing store's calibration data (exit_calibration.csv), so that the accuracy
lost against the full traces is at most EPS with probability at least 1 - DELTA (split-conformal risk control by
Learn-then-Test, as LYNX, arXiv 2512.05325, does). Pure numpy/scipy over the calibration file: no store, no model.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

from ..errors import TribunalError
from . import early_exit as ee

CALIBRATION_FILE = "exit_calibration.csv"
DIRECTIONS_FILE = "implicit_value_directions.json"
COLUMNS = ("trace", "problem_id", "chunk", "token_end", "chunk_correct", "trace_correct", "trace_tokens", "probe",
           "confidence")
OPTIONAL = ("trial_answer", "trial_answer_correct")
RULES = ("probe", "confidence", "trial_answer")  # trial_answer: offline only (no model forces answers at run time)
DEFAULT_DELTA = 0.1
GRID = tuple(sorted(set(ee.THRESHOLDS) | {1.0}, reverse=True))  # most cautious first: the fixed-sequence order
FORMS = ("a threshold is a number in [0, 1] (e.g. 0.8), `auto`, `conformal:EPS` or `conformal:EPS:DELTA` "
         f"(EPS and DELTA in (0, 1); DELTA defaults to {DEFAULT_DELTA})")


@dataclass(frozen=True)
class ThresholdSpec:
    kind: str  # "number" | "auto" | "conformal"
    text: str
    value: float | None = None  # kind "number"
    epsilon: float | None = None  # kind "conformal": the accuracy loss allowed
    delta: float | None = None  # kind "conformal": the chance the certificate is wrong


def parse_threshold(spec) -> ThresholdSpec:
    text = str(spec).strip()
    if text == "auto":
        return ThresholdSpec("auto", text)
    if text.startswith("conformal:"):
        parts = text.split(":")[1:]
        try:
            eps, delta = float(parts[0]), float(parts[1]) if len(parts) == 2 else DEFAULT_DELTA
        except (ValueError, IndexError):
            raise TribunalError(f"bad threshold {text!r}: {FORMS}") from None
        if len(parts) > 2 or not (0 < eps < 1 and 0 < delta < 1):
            raise TribunalError(f"bad threshold {text!r}: {FORMS}")
        return ThresholdSpec("conformal", text, epsilon=eps, delta=delta)
    try:
        tau = float(text)
    except ValueError:
        raise TribunalError(f"bad threshold {text!r}: {FORMS}") from None
    if not 0 <= tau <= 1:
        raise TribunalError(f"threshold {text} is outside [0, 1]: {FORMS}")
    return ThresholdSpec("number", text, value=tau)


def resolve_threshold(spec, probes_dir, rule: str, answer: str = "intermediate") -> tuple[float, dict]:
    """(tau, how): the threshold for `rule` (scores >= tau exit; inf = never exit) and how it was found, JSON-safe
    (how["threshold"] is None for never). answer "forced" makes `conformal:` grade exits by the trial answer
    where the calibration data has it (trial_answer_correct), else by the chunk's intermediate answer (said in how)."""
    if not isinstance(spec, ThresholdSpec):
        spec = parse_threshold(spec)
    if rule not in RULES:
        raise TribunalError(f"unknown exit rule {rule!r}: one of {', '.join(RULES)}")
    probes_dir = Path(probes_dir)
    if spec.kind == "number":
        return spec.value, {"spec": spec.text, "threshold": spec.value, "rule": "given"}
    if spec.kind == "auto":
        path = probes_dir / DIRECTIONS_FILE
        chunk = json.loads(path.read_text()).get("chunk", {}) if path.exists() else {}
        if "exit_thresholds" not in chunk:
            raise TribunalError(f"`auto` needs the exit thresholds in {path}: run `tribunal probe chunks` first")
        if rule not in chunk["exit_thresholds"]:
            raise TribunalError(f"{path} has no `auto` threshold for rule {rule!r} (it has "
                                f"{', '.join(chunk['exit_thresholds'])})")
        tau = chunk["exit_thresholds"][rule]
        how = chunk.get("exit_thresholds_how", {}).get(rule, {})
        return (math.inf if tau is None else float(tau)), {"spec": "auto", "threshold": tau, **how}
    path = probes_dir / CALIBRATION_FILE
    if not path.exists():
        raise TribunalError("`conformal:` needs the probing store's calibration data (exit_calibration.csv, written "
                            f"by `tribunal probe chunks`), and {path} does not exist")
    case, scores, extra = read_calibration(path)
    if rule not in scores:
        raise TribunalError(f"{path} has no {rule!r} column: rerun `tribunal probe chunks` with --model for it")
    graded = "intermediate answer"
    if answer == "forced" and "trial_answer_correct" in extra:
        case = ee.ExitCase(case.chunk_trace, case.chunk_tokens, extra["trial_answer_correct"], case.trace_correct,
                           case.trace_tokens, case.trace_group)
        graded = "trial answer"
    tau, how = conformal_threshold(case, scores[rule], spec.epsilon, spec.delta)
    return tau, {"spec": spec.text, "calibration": str(path), "exits_graded_by": graded, **how}


def problem_losses(case: ee.ExitCase, score, tau: float) -> np.ndarray:
    """Per problem: the share of its traces that the full run got right and the exit at tau gets wrong."""
    correct, _ = case.threshold_rule(score, tau)
    harm = case.trace_correct.astype(bool) & ~correct
    _, inverse = np.unique(case.trace_group, return_inverse=True)
    return np.bincount(inverse, harm) / np.bincount(inverse)


def p_value(losses, epsilon: float) -> float:
    """A valid p-value for H0: mean loss > epsilon, from n i.i.d. losses in [0, 1]: the exact binomial tail when
    every loss is 0 or 1, else Hoeffding-Bentkus (Bates et al. 2021, the p-value LTT uses)."""
    losses = np.asarray(losses, float)
    n, risk = len(losses), float(np.mean(losses))
    if np.all((losses == 0) | (losses == 1)):
        return float(binom.cdf(round(n * risk), n, epsilon))
    a = min(risk, epsilon)
    h1 = (a * math.log(a / epsilon) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - epsilon))
    bentkus = math.e * binom.cdf(math.ceil(n * risk - 1e-9), n, epsilon)
    return float(min(1.0, math.exp(-n * h1), bentkus))


def conformal_threshold(case: ee.ExitCase, score, epsilon: float, delta: float, grid=GRID) -> tuple[float, dict]:
    """The smallest threshold certified by Learn-then-Test (Angelopoulos et al. 2021, arXiv 2110.01052).

    Loss of a trace at tau: 1 when the full trace is right and the exited answer wrong (0 otherwise; the reverse,
    an exit that fixes a wrong trace, counts 0, so the loss bounds the net accuracy change too). The calibration
    units are problems (traces of one problem are not exchangeable with other problems' traces): each problem's
    loss is the mean over its traces. Hypotheses H_tau: R(tau) > epsilon are tested in a fixed sequence from the
    most cautious threshold (highest) down, each at level delta, stopping at the first not rejected; the loss
    need not be monotone in tau. Guarantee: if the calibration problems and the problems the policy will meet are
    i.i.d. draws from one distribution, their traces sampled by the same model and settings, and the run-time
    scores behave as the calibration scores, then with probability >= 1 - delta over the calibration draw every
    certified threshold, the returned one included, has R(tau) = E_problem[P(a trace of it is right in full and
    wrong when exited at tau)] <= epsilon. inf (never exit) when even the highest threshold is not certified."""
    tested, chosen = [], math.inf
    for tau in grid:
        losses = problem_losses(case, score, tau)
        p = p_value(losses, epsilon)
        _, tokens = case.threshold_rule(score, tau)
        tested.append({"threshold": float(tau), "risk": float(losses.mean()), "p": p,
                       "tokens_saved": float(1 - tokens.sum() / case.trace_tokens.sum())})
        if p > delta:
            break
        chosen = float(tau)
    return chosen, {"threshold": None if math.isinf(chosen) else chosen, "epsilon": epsilon, "delta": delta,
                    "problems": int(len(np.unique(case.trace_group))), "traces": int(len(case.trace_correct)),
                    "min_problems": math.ceil(math.log(delta) / math.log(1 - epsilon)),  # fewer never certify any
                    "rule": f"Learn-then-Test, fixed sequence from {grid[0]:g} down: the last threshold whose "
                            f"per-problem accuracy loss is certified <= {epsilon:g} at level {delta:g}",
                    "tested": tested}


def write_calibration(path, data, scores: dict) -> None:
    """exit_calibration.csv: one row per answering chunk, plus one (chunk -1, scores blank) per trace without one,
    so that per-problem losses average over every trace.

    `scores` maps column -> per-chunk array: "probe" must be the out-of-fold (nested) probability, because in-sample
    probabilities of a probe fit on these very chunks are optimistic and would make any calibration on them
    optimistic too. It is still an approximation: the run-time probe is the direction refit on all problems, which
    is a little better than any fold's."""
    columns = list(COLUMNS) + [c for c in OPTIONAL if c in scores]
    position = {t: j for j, t in enumerate(data.traces)}
    by_trace = {}
    for j, t in enumerate(data.trace):
        by_trace.setdefault(int(t), []).append(j)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for t in data.traces:
            k = position[t]
            facts = [int(data.trace_correct[k]), int(data.trace_tokens[k])]
            rows = by_trace.get(int(t), [])
            if not rows:
                w.writerow([int(t), int(data.trace_problem[k]), -1, "", "", *facts] + [""] * (len(columns) - 7))
            for j in rows:
                w.writerow([int(t), int(data.problem[j]), int(data.index[j]), int(data.token_end[j]), int(data.y[j]),
                            *facts] + [_fmt(scores[c][j]) for c in columns[7:]])


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.6g}"


def read_calibration(path) -> tuple[ee.ExitCase, dict, dict]:
    """(case, scores by rule, extra per-chunk columns) from exit_calibration.csv; a blank score never exits."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not set(COLUMNS) <= set(rows[0]):
        raise TribunalError(f"{path} is not an exit calibration file (columns {', '.join(COLUMNS)}): rerun "
                            "`tribunal probe chunks`")
    traces, trace_of = [], {}
    for r in rows:
        if r["trace"] not in trace_of:
            trace_of[r["trace"]] = len(traces)
            traces.append(r)
    chunks = [r for r in rows if int(r["chunk"]) >= 0]

    def col(name, rows=chunks):
        return np.array([float(r[name]) if r[name] != "" else np.nan for r in rows])

    case = ee.ExitCase(chunk_trace=np.array([trace_of[r["trace"]] for r in chunks], int),
                       chunk_tokens=col("token_end") + 1, chunk_correct=col("chunk_correct").astype(int),
                       trace_correct=col("trace_correct", traces).astype(int), trace_tokens=col("trace_tokens", traces),
                       trace_group=col("problem_id", traces).astype(np.int64))
    present = [c for c in RULES if c in rows[0]]
    extra = {c: np.nan_to_num(col(c)).astype(int) for c in OPTIONAL[1:] if c in rows[0]}
    return case, {c: col(c) for c in present}, extra
