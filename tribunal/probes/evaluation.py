"""Evaluation a reviewer accepts: problem-grouped folds, cross-validated metrics with intervals that include
refitting, calibration, permutations.

All samples of a problem sit on one side of every split. Every cross-validated figure is the mean over folds
of that fold's metric (each fold's model has its own scale and offset, so pooling out-of-fold scores across
folds biases ROC-AUC, below 0.5 under the null). Its variance has two parts: the held-out problems' (the
influence-curve variance of each fold's metric, LeDell, Petersen & van der Laan 2015, with a problem's traces
summed into one term because they are not independent) and refitting's (folds share training problems, so
their errors covary: Bates, Hastie & Tibshirani 2023), which the permutation null measures, since it refits
every fold on labels with the same clustering. docs/probes.md gives the simulation behind the choice
(tribunal/probes/simulation.py). Nothing here reads a store or knows about layers.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as student_t
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, balanced_accuracy_score, brier_score_loss, roc_auc_score

from ..errors import TribunalError


def grouped_folds(y, groups, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds with every problem on one side, stratified by label: problems, shuffled by seed, are ordered
    by their share of correct traces and dealt to the folds in turn (1, 2, .., K, K, .., 1, ...), so every
    fold gets problems from across the range of difficulty. (scikit-learn's StratifiedGroupKFold does this
    by search and costs 60 ms a call; nested selection and the simulation call it thousands of times.)"""
    y, groups = np.asarray(y), np.asarray(groups)
    problems, inverse = np.unique(groups, return_inverse=True)
    if len(np.unique(y)) < 2:
        raise TribunalError(f"only one class ({'correct' if y[0] else 'incorrect'}) among {len(y)} traces: "
                            "a probe needs both correct and incorrect traces")
    if len(problems) < n_splits:
        raise TribunalError(f"{len(problems)} problems are too few for {n_splits}-fold problem-grouped evaluation; "
                            "generate more problems or lower --folds")
    share = np.bincount(inverse, y) / np.bincount(inverse)
    shuffled = np.random.default_rng(seed).permutation(len(problems))
    order = shuffled[np.argsort(share[shuffled], kind="stable")]
    lap = np.concatenate([np.arange(n_splits), np.arange(n_splits)[::-1]])
    fold_of = np.empty(len(problems), int)
    fold_of[order] = np.resize(lap, len(problems))
    rows = fold_of[inverse]
    folds = [(np.flatnonzero(rows != k), np.flatnonzero(rows == k)) for k in range(n_splits)]
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


def _balanced_accuracy(y, pred) -> float:
    with warnings.catch_warnings():  # a fold may miss a class among the predictions: fine
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y, pred))


METRICS = ("auroc", "balanced_accuracy", "accuracy")
INTERVALS = ("95% CIs: mean over folds of each fold's metric, variance = the held-out problems' (influence curve, "
             "problem-level) + refitting's (measured by the permutation null); t quantile, Welch-Satterthwaite df "
             "(each fold's variance on its problems - 1, refitting's on the permutations - 1), for the nested "
             "figures the smallest fold's problems - 1")


def _fold_terms(y, score) -> dict:
    """Per metric, on one fold: its value per column and each trace's influence term (value - truth ~ their
    sum). y and score: (n,) or (n, columns), scores as probabilities (accuracy at 0.5). Vectorized over columns
    because the permutation null scores 50 label vectors at once."""
    y, s = np.broadcast_arrays(*(np.asarray(v) if np.ndim(v) == 2 else np.asarray(v)[:, None] for v in (y, score)))
    y = y.astype(bool)
    n1 = y.sum(axis=0)
    n0 = len(y) - n1
    rank = rankdata(s, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # placement values: for a correct trace, the share of incorrect ones it outscores (ties half); for an
        # incorrect one, the share of correct ones that outscore it. Their class means are the AUROC.
        below = (rank - rankdata(np.where(y, s, np.inf), axis=0)) / n0
        above = (n1 - (rank - rankdata(np.where(y, np.inf, s), axis=0))) / n1
        place = np.where(y, below, above)
        auc = np.where(y, place, 0).sum(axis=0) / n1
        hit = (s >= 0.5) == y
        acc = hit.mean(axis=0)
        tpr, tnr = (hit & y).sum(axis=0) / n1, (hit & ~y).sum(axis=0) / n0
        return {"auroc": (auc, np.where(y, (place - auc) / n1, (place - auc) / n0)),
                "balanced_accuracy": ((tpr + tnr) / 2, np.where(y, (hit - tpr) / (2 * n1), (hit - tnr) / (2 * n0))),
                "accuracy": (acc, (hit - acc) / len(y))}


def _cluster_variance(terms, groups) -> np.ndarray:
    """Variance of a sum of influence terms when a problem's traces are one independent unit (the problem-level
    sandwich, with the m/(m-1) small-sample factor)."""
    _, inverse = np.unique(groups, return_inverse=True)
    m = int(inverse.max()) + 1
    if terms.shape[1] == 1:
        sums = np.bincount(inverse, terms[:, 0], m)[:, None]
    else:
        sums = np.zeros((m, terms.shape[1]))
        np.add.at(sums, inverse, terms)
    return (sums ** 2).sum(axis=0) * m / max(m - 1, 1)


def cv_values(y, score, folds, groups) -> dict:
    """Per metric: (mean over folds of each fold's value, the held-out variance of that mean, and that variance's
    Welch-Satterthwaite term: the sum over folds of (its share of the variance)^2 / (its problems - 1)), per column."""
    groups = np.asarray(groups)
    per_fold = [(_fold_terms(np.asarray(y)[test], np.asarray(score)[test]), groups[test]) for _, test in folds]
    problems = np.array([max(len(np.unique(g)) - 1, 1) for _, g in per_fold], float)[:, None]
    out = {}
    for name in METRICS:
        values = np.array([terms[name][0] for terms, _ in per_fold])
        variances = np.array([_cluster_variance(np.nan_to_num(terms[name][1]), g) for terms, g in per_fold])
        variances[np.isnan(values)] = np.nan
        defined = np.maximum((~np.isnan(values)).sum(axis=0), 1)
        shares = variances / defined ** 2
        out[name] = (np.nanmean(values, axis=0) if np.isfinite(values).any() else np.full(values.shape[1], np.nan),
                     np.nansum(shares, axis=0), np.nansum(shares ** 2 / problems, axis=0))
    return out


def satterthwaite_df(variance: float, term: float, refit: float = 0.0, refit_df: int = 0) -> float:
    """Degrees of freedom of a sum of independent variance estimates (Welch-Satterthwaite): the folds' held-out
    variances (term, from cv_values) and refitting's, estimated from refit_df + 1 permutations. With folds of equal
    variance it is the folds' problems - 1 summed; the smallest fold's problems - 1 (its lower bound) made
    intervals of small folds conservative."""
    denominator = term + (refit ** 2 / refit_df if refit > 0 and refit_df > 0 else 0.0)
    total = variance + refit
    return float(total ** 2 / denominator) if denominator > 0 and total > 0 else 1.0


def smallest_fold_df(folds, groups) -> int:
    """Satterthwaite's lower bound on the df of the folds' summed variances: the smallest fold's problems - 1. The
    nested figures take it: their refitting variance combines the candidates' through an approximate correlation
    (search.nested_refit_variance), whose own df is unknown; Welch-Satterthwaite there covered 0.5 in only 92.5% of
    null data sets at 40 problems x 2, d 512 (docs/probes.md)."""
    groups = np.asarray(groups)
    return max(1, min(len(np.unique(groups[test])) for _, test in folds) - 1)


def cv_interval(values: tuple, refit: float = 0.0, refit_df: int = 0, column: int = 0, df: float | None = None) -> dict:
    """The 95% CI of one column of a cv_values metric, with refitting's variance added; df: Welch-Satterthwaite's
    unless given (the nested figures give smallest_fold_df)."""
    mean, variance, term = (np.atleast_1d(v)[column] for v in values)
    return interval(mean, variance + refit, satterthwaite_df(variance, term, refit, refit_df) if df is None else df)


def refit_variance(null_values: dict) -> dict:
    """Per metric, what refitting adds to the held-out variance: the permutation null's spread of the CV
    metric beyond what its own held-out variances explain (the covariance between folds that share training
    problems). null_values: cv_values of the permuted label vectors. Zero without permutations."""
    out = {}
    for name, (values, variances, *_) in null_values.items():
        ok = np.isfinite(values)
        out[name] = float(max(0.0, np.var(values[ok], ddof=1) - np.mean(variances[ok]))) if ok.sum() > 2 else 0.0
    return out


def interval(value: float, variance: float, df: float, bounds=(0.0, 1.0)) -> dict:
    """value [95% CI] from a t interval with df degrees of freedom (satterthwaite_df), kept inside bounds."""
    se = float(np.sqrt(variance))
    half = float(student_t.ppf(0.975, max(df, 1))) * se
    return {"value": float(value), "ci": [float(max(bounds[0], value - half)), float(min(bounds[1], value + half))],
            "se": se}


def cv_metrics(y, score, folds, groups, refit: dict | None = None, refit_df: int = 0) -> dict:
    """Cross-validated ROC-AUC, balanced accuracy and accuracy of out-of-fold probabilities: each the mean over
    folds, with a 95% CI whose variance is the held-out one plus refit[metric] (from refit_variance, estimated on
    refit_df + 1 permutations)."""
    values = cv_values(y, score, folds, groups)
    return {name: cv_interval(values[name], (refit or {}).get(name, 0.0), refit_df) for name in METRICS}


def heldout_metrics(y, score, groups) -> dict:
    """The metrics of one fitted model on held-out problems (one fold, nothing refit), with 95% CIs."""
    y = np.asarray(y)
    return cv_metrics(y, score, [(np.zeros(0, int), np.arange(len(y)))], groups)


def paired_auroc_difference(y, score, other, folds, groups, refit: float = 0.0, refit_df: int = 0,
                            df: float | None = None) -> dict:
    """AUROC(score) - AUROC(other) on the same folds and traces, with its 95% CI: the per-fold differences'
    influence terms cancel what the two share, so the interval is narrower than either's. refit: the refitting
    variance of the difference (the probe's; a baseline of one or two features barely overfits)."""
    y, groups = np.asarray(y), np.asarray(groups)
    diffs, variances, problems = [], [], []
    for _, test in folds:
        a, b = _fold_terms(y[test], np.asarray(score)[test])["auroc"], _fold_terms(y[test], np.asarray(other)[test])["auroc"]
        if np.isnan(a[0][0]) or np.isnan(b[0][0]):
            continue
        diffs.append(a[0][0] - b[0][0])
        variances.append(_cluster_variance(a[1] - b[1], groups[test])[0])
        problems.append(max(len(np.unique(groups[test])) - 1, 1))
    shares = np.array(variances) / max(len(diffs), 1) ** 2
    variance, term = float(shares.sum()), float((shares ** 2 / np.array(problems, float)).sum()) if diffs else 0.0
    return interval(float(np.mean(diffs)) if diffs else float("nan"), variance + refit,
                    satterthwaite_df(variance, term, refit, refit_df) if df is None else df, bounds=(-1.0, 1.0))


def ratio_interval(numerator, denominator, groups) -> dict:
    """sum(numerator) / sum(denominator) over traces, with a 95% CI from the problem-level influence terms
    (the delta method for a ratio of sums): early exit's accuracy and token share."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    value = numerator.sum() / denominator.sum()
    terms = ((numerator - value * denominator) / denominator.sum())[:, None]
    return interval(value, _cluster_variance(terms, groups)[0], max(1, len(np.unique(groups)) - 1),
                    bounds=(-1.0, 1.0))


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


def _group_index(groups) -> list[np.ndarray]:
    """Row indices of each problem, in one sort."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


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
