"""The search over candidate feature sets (cells of the trajectory probe, layers of the chunk probe), one way:
every candidate's probe on shared problem-grouped folds, one permutation null shared by all candidates (per
candidate p and the family-wise, max-statistic p), and nested selection (each outer fold's training problems
choose the candidate by inner grouped CV) whose held-out figure is the headline.

Candidates are scored one at a time (score_candidate), so a caller that reads features layer by layer keeps
one layer in memory; select() then needs only what each candidate returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import evaluation as ev
from .config import DEFAULTS


def make_probe(C: float = DEFAULTS.C):
    """The probe: standardize, then L2 logistic regression (scikit-learn, no hidden state)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


def cv_predict(make_model, X, y, folds) -> np.ndarray:
    """Out-of-fold probabilities of the positive class (scikit-learn's cross_val_predict)."""
    return cross_val_predict(make_model(), X, y, cv=folds, method="predict_proba")[:, 1]


def direction_of(model) -> dict:
    """The fitted probe as a direction in the original activation space: logit = norm * (u . x) + bias."""
    scaler, logistic = model[0], model[-1]
    coef = logistic.coef_[0] / scaler.scale_
    bias = float(logistic.intercept_[0] - np.sum(logistic.coef_[0] * scaler.mean_ / scaler.scale_))
    norm = float(np.linalg.norm(coef))
    return {"direction": (coef / norm).tolist(), "weight_norm": norm, "bias": bias,
            "scaler_mean": scaler.mean_.tolist(), "scaler_scale": scaler.scale_.tolist(),
            "coef_standardized": logistic.coef_[0].tolist(), "intercept_standardized": float(logistic.intercept_[0])}


class FoldFeatures:
    """One candidate's features made ready once per fold (standardized on the training part; with more
    dimensions than training traces, expressed in the span of the training rows, where the L2 solution lies by
    the representer theorem), so that fitting the probe to many label vectors (the observed labels and every
    permutation) redoes only the logistic fit, for all label vectors at once.

    The fit is make_probe's model (L2 logistic regression, unpenalized intercept, C) solved here rather than by
    scikit-learn for that batching: by the fixed-curvature (Böhning) majorizer, whose one inverse serves
    every label vector, while the data are not separable; by Newton's method otherwise. Tests hold it equal to
    scikit-learn's fit.
    """

    def __init__(self, X, folds, C: float = DEFAULTS.C):
        self.folds, self.C, self.parts = folds, C, []
        for train, test in folds:
            mean, scale = X[train].mean(axis=0), X[train].std(axis=0)  # StandardScaler's, without its checks
            scale[scale == 0] = 1.0
            a, b = (X[train] - mean) / scale, (X[test] - mean) / scale
            basis = np.linalg.qr(a.T)[0] if a.shape[1] >= a.shape[0] else None  # the training rows' span
            if basis is not None:
                a, b = a @ basis, b @ basis
            self.parts.append((train, test, np.column_stack([np.ones(len(a)), a]),
                               np.column_stack([np.ones(len(b)), b]), (mean, scale, basis)))

    def fit(self, labels) -> list[np.ndarray]:
        """Every fold's probe fit to labels ((n, columns)): per fold, (features + 1, columns) coefficients."""
        return [fit_logistic(a, labels[train], self.C) for train, _, a, _, _ in self.parts]

    def fit_out_of_fold(self, labels) -> np.ndarray:
        """Fit every fold's probe to labels ((n,) or (n, columns)); return the out-of-fold probabilities."""
        labels = np.asarray(labels, float)
        Y = labels[:, None] if labels.ndim == 1 else labels
        prob = np.zeros(Y.shape)
        for (_, test, _, b, _), theta in zip(self.parts, self.fit(Y)):
            prob[test] = 1 / (1 + np.exp(-(b @ theta)))
        return prob[:, 0] if labels.ndim == 1 else prob

    def logits_of(self, thetas: list[np.ndarray], X) -> list[np.ndarray]:
        """Each fold's fitted probe (fit's output) applied to other traces X: per fold, (rows, columns) logits.
        The simulation scores fresh data with it, for the population AUROC of the very models a CV scored."""
        out = []
        for (_, _, _, _, (mean, scale, basis)), theta in zip(self.parts, thetas):
            z = (X - mean) / scale
            z = z @ basis if basis is not None else z
            out.append(theta[0] + z @ theta[1:])
        return out


def fit_logistic(Z, Y, C: float = DEFAULTS.C, tol: float = 1e-4, majorizer_steps: int = 200) -> np.ndarray:
    """(features + 1, columns) coefficients, intercept first, of L2 logistic regressions on Z = [1, features]:
    minimize C * sum(log-loss) + |w|^2 / 2, one per column of Y. tol: the largest coefficient step at which a
    column counts as converged (its probabilities are then within about 1e-6 of the optimum's)."""
    n, p = Z.shape
    penalty = np.full(p, 1.0 / C)
    penalty[0] = 0.0
    theta = np.zeros((p, Y.shape[1]))
    # the Hessian never exceeds Z'Z/4 + penalty: one inverse serves every column and every step
    bound = np.linalg.inv(0.25 * Z.T @ Z + np.diag(penalty))  # positive definite, well conditioned
    for _ in range(majorizer_steps if p <= n else 3):  # separable (p > n): a start for Newton's steps
        step = bound @ _gradient(Z, Y, theta, penalty)
        theta -= (1.5 if p <= n else 1.0) * step  # over-relaxed where Newton finishes only what stalls
        if np.abs(step).max() < tol:
            return theta
    return _newton(Z, Y, theta, penalty, tol)


def _gradient(Z, Y, theta, penalty):
    return Z.T @ (1 / (1 + np.exp(-(Z @ theta))) - Y) + penalty[:, None] * theta


def _objective(Z, Y, theta, penalty):
    eta = Z @ theta
    return (np.logaddexp(0, eta) - Y * eta).sum(axis=0) + 0.5 * (penalty[:, None] * theta ** 2).sum(axis=0)


def _newton(Z, Y, theta, penalty, tol: float, max_steps: int = 100) -> np.ndarray:
    """Damped Newton steps for the columns not yet converged (step halving keeps each objective decreasing)."""
    active = np.arange(Y.shape[1])
    for _ in range(max_steps):
        t, y = theta[:, active], Y[:, active]
        mu = 1 / (1 + np.exp(-(Z @ t)))
        grad = Z.T @ (mu - y) + penalty[:, None] * t
        hess = (Z.T[None] * (mu * (1 - mu)).T[:, None, :]) @ Z
        hess[:, np.arange(len(penalty)), np.arange(len(penalty))] += penalty
        step = np.linalg.solve(hess, grad.T[:, :, None])[:, :, 0].T
        before, scale = _objective(Z, y, t, penalty), np.ones(len(active))
        for _ in range(30):
            worse = _objective(Z, y, t - scale * step, penalty) > before + 1e-12
            if not worse.any():
                break
            scale[worse] /= 2
        theta[:, active] = t - scale * step
        done = np.abs(scale * step).max(axis=0) < tol
        active = active[~done]
        if not len(active):
            break
    return theta


@dataclass
class Design:
    """What every candidate shares: labels, problems, outer folds, each outer training part's inner folds, and
    the permuted label vectors of the null (whole problems' labels permuted among problems with as many samples)."""

    y: np.ndarray
    groups: np.ndarray
    outer: list
    inner: list
    permuted: np.ndarray  # (n, permutations)

    @property
    def nested_df(self) -> int:
        """The nested figures' df (evaluation.smallest_fold_df)."""
        return ev.smallest_fold_df(self.outer, self.groups)

    @property
    def refit_df(self) -> int:
        """Degrees of freedom of refitting's variance, the spread of the permuted label vectors' CV metrics."""
        return max(self.permuted.shape[1] - 1, 0)


def design(y, groups, folds: int, seed: int, permutations: int) -> Design:
    y, groups = np.asarray(y), np.asarray(groups)
    outer = ev.grouped_folds(y, groups, folds, seed)
    inner = [ev.grouped_folds(y[tr], groups[tr], max(2, min(folds - 1, len(np.unique(groups[tr])))), seed + 1)
             for tr, _ in outer]
    rng = np.random.default_rng(seed + 7)
    permuted = np.zeros((len(y), permutations), int)
    for _, test in outer:  # within each outer fold, so every fold keeps its observed label composition
        for j in range(permutations):
            permuted[test, j] = ev.permute_problems(y[test], groups[test], rng)
    return Design(y, groups, outer, inner, permuted)


@dataclass
class Candidate:
    """One candidate scored: its out-of-fold probabilities and CV metrics (CIs with refitting's variance), the
    null's CV ROC-AUCs, and per outer fold the inner-CV ROC-AUC and probabilities that nested selection uses."""

    key: object
    oof: np.ndarray
    metrics: dict
    refit: dict
    null_auroc: np.ndarray
    permutation_p: float
    inner_auroc: list = field(default_factory=list)
    inner_oof: list = field(default_factory=list)


def score_candidate(d: Design, key, X, C: float = DEFAULTS.C) -> Candidate:
    """The probe on the outer folds for the observed and every permuted label vector (one batched fit), and
    on each outer training part's inner folds for nested selection."""
    labels = np.column_stack([d.y, d.permuted])
    prob = FoldFeatures(X, d.outer, C).fit_out_of_fold(labels)
    values = ev.cv_values(labels, prob, d.outer, d.groups)
    null = {name: (v[1:], var[1:]) for name, (v, var, _) in values.items()}
    refit = ev.refit_variance(null)
    metrics = {name: ev.cv_interval(values[name], refit[name], d.refit_df) for name in ev.METRICS}
    observed = metrics["auroc"]["value"]
    p = ev.permutation_pvalue(observed, null["auroc"][0]) if d.permuted.shape[1] else float("nan")
    inner_oof = [FoldFeatures(X[tr], inner, C).fit_out_of_fold(d.y[tr]) for (tr, _), inner in zip(d.outer, d.inner)]
    inner_auroc = [float(ev.cv_values(d.y[tr], p_, inner, d.groups[tr])["auroc"][0][0])
                   for (tr, _), inner, p_ in zip(d.outer, d.inner, inner_oof)]
    return Candidate(key, prob[:, 0], metrics, refit, null["auroc"][0], p, inner_auroc, inner_oof)


def nested_refit_variance(candidates: list[Candidate], chosen: list[int]) -> dict:
    """Refitting's variance for the nested figure, whose folds may use different candidates. Refitting adds the
    covariance between pairs of folds; a pair that chose one candidate covaries as that candidate's folds do, a
    pair that chose two covaries as much as those two candidates' CV ROC-AUCs correlate under the permutation
    null (1 for one set of features, near 0 for unrelated ones): the mean over pairs of
    rho(a, b) * sqrt(refit(a) * refit(b))."""
    k = len(chosen)
    nulls = np.array([c.null_auroc for c in candidates])
    if nulls.shape[1] > 2 and len(candidates) > 1:
        with np.errstate(invalid="ignore"):
            rho = np.nan_to_num(np.corrcoef(nulls), nan=1.0).clip(0, 1)
        np.fill_diagonal(rho, 1.0)
    else:
        rho = np.ones((len(candidates), len(candidates)))
    pairs = [(a, b) for a in chosen for b in chosen] if k == 1 else \
        [(chosen[i], chosen[j]) for i in range(k) for j in range(k) if i != j]
    return {name: float(np.mean([rho[a, b] * np.sqrt(candidates[a].refit[name] * candidates[b].refit[name])
                                 for a, b in pairs])) for name in ev.METRICS}


def _best(aurocs) -> int:
    """The index of the highest ROC-AUC; an undefined one (NaN: a fold with one class) never wins, unless all are."""
    aurocs = np.asarray(aurocs, dtype=float)
    return 0 if np.isnan(aurocs).all() else int(np.nanargmax(aurocs))


def select(d: Design, candidates: list[Candidate], what: str = "candidates") -> dict:
    """Nested selection and the family-wise p over all candidates.

    Each outer fold takes the candidate with the best inner-CV ROC-AUC on its training part; its held-out
    probabilities are that candidate's outer ones (the same fit). The family-wise p compares the best observed
    CV ROC-AUC with the best of all candidates under each permutation."""
    nested = np.zeros(len(d.y))
    chosen = []
    for k, (_, test) in enumerate(d.outer):
        best = _best([c.inner_auroc[k] for c in candidates])
        chosen.append(best)
        nested[test] = candidates[best].oof[test]
    refit = nested_refit_variance(candidates, chosen)
    values = ev.cv_values(d.y, nested, d.outer, d.groups)
    best = _best([c.metrics["auroc"]["value"] for c in candidates])
    observed = candidates[best].metrics["auroc"]["value"]
    permutations = d.permuted.shape[1]
    null_best = np.max([c.null_auroc for c in candidates], axis=0) if permutations else np.zeros(0)
    return {
        "chosen": chosen, "best": best, "oof_probability": nested, "refit": refit,
        "nested_metrics": {name: ev.cv_interval(values[name], refit[name], df=d.nested_df) for name in ev.METRICS},
        "family_wise": {
            "method": f"max-statistic permutation test: under each of {permutations} grouped permutations, the best "
                      f"CV ROC-AUC of all {len(candidates)} {what}; p = share of permutations whose best reaches "
                      "the observed best",
            "observed_best_auroc": observed, "permutations": permutations,
            "p": ev.permutation_pvalue(observed, null_best) if permutations else float("nan")},
    }
