"""Evaluation a reviewer accepts: problem-grouped folds, problem-level bootstrap CIs, calibration, permutations.

All samples of a problem sit on one side of every split; confidence intervals
resample problems, not traces, because traces of one problem are not
independent. Nothing here reads a store or knows about layers.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
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
    """ROC-AUC by ranks (Mann-Whitney), ties averaged; nan with one class."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def metrics(y, score) -> dict:
    """Accuracy and balanced accuracy at p = 0.5, and ROC-AUC, of probabilities `score`."""
    y, score = np.asarray(y).astype(int), np.asarray(score)
    pred = (score >= 0.5).astype(int)
    recalls = [np.mean(pred[y == c] == c) for c in (0, 1) if np.any(y == c)]
    return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recalls)),
            "auroc": auroc(y, score)}


def _group_index(groups) -> list[np.ndarray]:
    """Row indices of each problem, in one sort (token-level bootstraps have millions of rows)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def bootstrap(y, scores: dict, groups, n_boot: int = 1000, seed: int = 0, paired_with: str | None = None) -> dict:
    """95% CIs by resampling problems. scores: name -> per-trace probabilities/scores.

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
            m = metrics(y[idx], s[idx])
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
    """Brier score, expected calibration error and the reliability curve (equal-width bins)."""
    y, prob = np.asarray(y, float), np.asarray(prob, float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            conf, acc = prob[sel].mean(), y[sel].mean()
            ece += sel.mean() * abs(conf - acc)
            curve.append({"bin": [float(edges[b]), float(edges[b + 1])], "mean_predicted": float(conf),
                          "fraction_correct": float(acc), "count": int(sel.sum())})
    return {"brier": float(np.mean((prob - y) ** 2)), "ece": float(ece), "reliability_curve": curve}


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
