"""Evaluation a reviewer accepts: problem-grouped folds, problem-level bootstrap CIs, calibration, permutations.

All samples of a problem sit on one side of every split; confidence intervals
resample problems, not traces, because traces of one problem are not
independent. Nothing here reads a store or knows about layers.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, balanced_accuracy_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ..errors import TribunalError


def grouped_folds(y, groups, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds with every problem on one side, stratified by label where the data allows."""
    y, groups = np.asarray(y), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if len(np.unique(y)) < 2:
        raise TribunalError(f"only one class ({'correct' if y[0] else 'incorrect'}) among {len(y)} traces: "
                            "a probe needs both correct and incorrect traces")
    if n_groups < n_splits:
        raise TribunalError(f"{n_groups} problems are too few for {n_splits}-fold problem-grouped evaluation; "
                            "generate more problems or lower --folds")
    try:
        folds = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, y, groups))
    except ValueError:
        folds = list(GroupKFold(n_splits=n_splits).split(y, y, groups))
    for train, test in folds:
        if len(np.unique(y[train])) < 2:
            raise TribunalError("a training fold has one class only: too few problems of one outcome; generate more")
    return folds


def auroc(y, score) -> float:
    """ROC-AUC (scikit-learn); nan with one class, where it is undefined."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def metrics(y, score) -> dict:
    """Accuracy and balanced accuracy at p = 0.5, and ROC-AUC, of probabilities `score`."""
    y, score = np.asarray(y).astype(int), np.asarray(score)
    pred = (score >= 0.5).astype(int)
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": _balanced_accuracy(y, pred),
            "auroc": auroc(y, score)}


def fast_metrics(y, score) -> dict:
    """metrics() without scikit-learn's per-call input checks, which cost 5 ms a call here (50x the arithmetic):
    the bootstrap and the permutation null evaluate 10^4-10^5 resamples. Hand-written for that reason alone;
    tests/test_probes.py holds it equal to metrics()."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score)
    pred = score >= 0.5
    n1 = int(y.sum())
    n0 = len(y) - n1
    recalls = [np.mean(pred[y] == 1)] if n1 else []
    recalls += [np.mean(pred[~y] == 0)] if n0 else []
    if n1 and n0:
        ranks = rankdata(score)
        auc = float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    else:
        auc = float("nan")
    return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recalls)), "auroc": auc}


def _balanced_accuracy(y, pred) -> float:
    with warnings.catch_warnings():  # a bootstrap resample may miss a class among the predictions: fine
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y, pred))


def _group_index(groups) -> list[np.ndarray]:
    """Row indices of each problem, in one sort (token-level bootstraps have millions of rows)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def bootstrap(y, scores: dict, groups, n_boot: int = 1000, seed: int = 0, paired_with: str | None = None) -> dict:
    """95% CIs by resampling problems (hand-written: scikit-learn has no grouped bootstrap). scores: name -> per-trace probabilities/scores.

    With paired_with="probe", also the CI of AUROC(probe) - AUROC(other) for every other score, on the
    same resamples: the probe beats a baseline when that difference's CI lies above 0.
    """
    y = np.asarray(y)
    members = _group_index(groups)
    rng = np.random.default_rng(seed)
    scores = {name: np.asarray(s) for name, s in scores.items()}
    draws = {name: {"accuracy": [], "balanced_accuracy": [], "auroc": []} for name in scores}
    diffs = {name: [] for name in scores if paired_with is not None and name != paired_with}
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in pick])
        if len(np.unique(y[idx])) < 2:
            continue
        values = {}
        for name, s in scores.items():
            m = fast_metrics(y[idx], s[idx])
            values[name] = m["auroc"]
            for k, v in m.items():
                draws[name][k].append(v)
        for name in diffs:
            diffs[name].append(values[paired_with] - values[name])
    out = {}
    for name, s in scores.items():
        point = metrics(y, s)
        out[name] = {k: {"value": float(point[k]), "ci": _ci(draws[name][k])} for k in point}
    if paired_with is not None:
        ref = out[paired_with]["auroc"]["value"]
        out["paired_auroc_difference"] = {
            name: {"value": ref - out[name]["auroc"]["value"], "ci": _ci(d)} for name, d in diffs.items()}
    return out


def _ci(values) -> list[float]:
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def calibration(y, prob, bins: int = 10) -> dict:
    """Brier score, expected calibration error and the reliability curve (equal-width bins), with the values of
    the two constant predictors a reader should compare with: always 0.5, and always the base rate."""
    y, prob = np.asarray(y, float), np.asarray(prob, float)
    which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], prob)  # calibration_curve's own binning
    fraction, predicted = calibration_curve(y, prob, n_bins=bins, strategy="uniform")
    counts = np.bincount(which, minlength=bins)
    occupied = np.flatnonzero(counts)
    curve = [{"bin": [b / bins, (b + 1) / bins], "mean_predicted": float(m), "fraction_correct": float(f),
              "count": int(counts[b])} for b, m, f in zip(occupied, predicted, fraction)]
    ece = float(sum(c["count"] * abs(c["mean_predicted"] - c["fraction_correct"]) for c in curve) / max(len(y), 1))
    base_rate = float(y.mean())
    return {"brier": float(brier_score_loss(y, prob)), "ece": ece, "reliability_curve": curve,
            "reference": {"base_rate": base_rate, "brier_constant_half": 0.25,
                          "brier_constant_base_rate": base_rate * (1 - base_rate), "ece_constant_base_rate": 0.0}}


def calibration_verdict(cal: dict) -> str:
    """In words: is the probe's Brier score better than always saying 0.5, or the base rate?"""
    ref = cal["reference"]
    if cal["brier"] >= ref["brier_constant_half"]:
        return (f"worse than a constant prediction of 0.5 (Brier {cal['brier']:.3f} vs {ref['brier_constant_half']:.3f}): "
                "the probabilities are not to be trusted as probabilities")
    if cal["brier"] >= ref["brier_constant_base_rate"]:
        return (f"worse than always predicting the base rate {ref['base_rate']:.2f} (Brier {cal['brier']:.3f} vs "
                f"{ref['brier_constant_base_rate']:.3f})")
    return (f"better than always predicting the base rate {ref['base_rate']:.2f} (Brier {cal['brier']:.3f} vs "
            f"{ref['brier_constant_base_rate']:.3f})")


def permute_problems(y, groups, rng) -> np.ndarray:
    """The grouped null: whole problems' label vectors permuted among problems with as many samples.

    Labels stay clustered by problem, as they are in real data, while any link between a problem's
    activations and its outcome is broken.
    """
    y = np.asarray(y)
    out = y.copy()
    members = _group_index(groups)
    by_size: dict[int, list[np.ndarray]] = {}
    for idx in members:
        by_size.setdefault(len(idx), []).append(idx)
    for same in by_size.values():
        order = rng.permutation(len(same))
        for dst, src in zip(same, order):
            out[dst] = y[same[src]]
    return out


def permutation_pvalue(observed: float, null: list[float]) -> float:
    """One-sided p-value with the +1 correction: P(null >= observed)."""
    null = np.asarray(null)
    return float((1 + np.sum(null >= observed)) / (1 + len(null)))
