"""Trajectory-level probes: one standardized logistic regression per (layer, aggregation), honestly evaluated.

For every cell the probe and its baselines are scored on the same problem-grouped
folds: majority class, trace length alone, output confidence (mean log-prob and
entropy of the generated tokens), a random direction, and a grouped permutation
test shared by all cells (so a family-wise, max-statistic p covers the search). The
headline is the nested cross-validation figure of the selection procedure, which
never saw its own test fold; the cell kept for directions is the selection refit on
all problems. Reads each layer dataset once, sequentially.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from ..errors import TribunalError
from ..store.reader import AGGREGATIONS, DEFAULT_BLOCK_BYTES, Store
from . import evaluation as ev

LABEL_POSITIVE = "correct"
BASELINES = ("majority", "length", "confidence", "random_direction")


def make_probe(C: float = 1.0):
    """The probe: standardize, then L2 logistic regression (scikit-learn, no hidden state)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


@dataclass
class TrajectoryData:
    """Per-trace features and labels of the graded traces (unparsed ones are left out)."""

    y: np.ndarray
    groups: np.ndarray
    trace_index: np.ndarray
    lengths: np.ndarray
    confidence: np.ndarray | None
    features: dict = field(default_factory=dict)  # (layer, aggregation) -> (n, d_model) float32
    k: int = 10


def load_trajectory_data(store: Store, layers=None, aggregations=AGGREGATIONS, k: int = 10,
                         block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False) -> TrajectoryData:
    layers = store.check_layers(layers)
    labels = store.labels
    keep = np.flatnonzero(np.isin(labels, ["correct", "incorrect"]))
    if len(keep) == 0:
        raise TribunalError("the store has no graded (correct/incorrect) traces to probe")
    y = (labels[keep] == LABEL_POSITIVE).astype(int)
    data = TrajectoryData(y=y, groups=store.table["problem_id"][keep].astype(np.int64), trace_index=keep,
                          lengths=store.generated_lengths[keep].astype(float), confidence=_confidence(store, keep), k=k)
    for layer in tqdm(layers, desc="aggregating layers", disable=not progress):
        aggs = store.aggregate(layer, aggregations, k, block_bytes)
        for name, values in aggs.items():
            data.features[(layer, name)] = values[keep]
    return data


def _confidence(store: Store, keep) -> np.ndarray | None:
    """(mean log-prob, mean entropy) of each trace's generated tokens, or None when the store lacks them."""
    out = np.full((store.n_traces, 2), np.nan)
    for s, shard in enumerate(store.shards):
        if shard.n_tokens == 0:
            continue
        logprob, entropy = shard.token_array("logprob"), shard.token_array("entropy")
        gen = shard.token_array("is_generated")
        lo = store.trace_offsets[s]
        for j, row in enumerate(shard.table):
            a, b = int(row["token_start"]), int(row["token_end"])
            g = gen[a:b]
            if g.any():
                out[lo + j] = [np.nanmean(logprob[a:b][g]), np.nanmean(entropy[a:b][g])]
    out = out[keep]
    return None if np.isnan(out).all() else np.nan_to_num(out, nan=np.nanmean(out, axis=0))


class FoldFits:
    """One cell's features made ready once per fold, so the probe's many refits (its own, then one per
    permutation of the labels) redo only the logistic fit.

    Hand-written instead of cross_val_predict for that reuse: standardizing depends on the features alone,
    never on the labels being permuted, and the L2 solution lies in the span of the training rows
    (representer theorem), so with more dimensions than training traces each fold is fitted, exactly, in
    that span's coordinates. Each fold's model starts from its last solution (warm start).
    """

    def __init__(self, X, folds, C: float = 1.0):
        self.parts = []
        for train, test in folds:
            scaler = StandardScaler().fit(X[train])
            a, b = scaler.transform(X[train]), scaler.transform(X[test])
            if a.shape[1] > a.shape[0]:
                basis = np.linalg.svd(a, full_matrices=False)[2].T
                a, b = a @ basis, b @ basis
            self.parts.append((train, test, a, b, LogisticRegression(C=C, max_iter=2000, warm_start=True)))

    def predict(self, y) -> np.ndarray:
        """Out-of-fold probabilities of the positive class for labels y."""
        prob = np.zeros(len(y))
        for train, test, a, b, model in self.parts:
            prob[test] = model.fit(a, y[train]).predict_proba(b)[:, 1]
        return prob


def cv_predict(make_model, X, y, folds) -> np.ndarray:
    """Out-of-fold probabilities of the positive class (scikit-learn's cross_val_predict)."""
    return cross_val_predict(make_model(), X, y, cv=folds, method="predict_proba")[:, 1]


def baseline_scores(data: TrajectoryData, folds) -> dict:
    """Out-of-fold probabilities of each baseline on the given folds."""
    y = data.y
    # one constant score: AUROC 0.5 by definition, accuracy = the majority class's share
    out = {"majority": np.full(len(y), 0.5 + (1e-9 if y.mean() >= 0.5 else -1e-9))}
    out["length"] = cv_predict(make_probe, np.log1p(data.lengths)[:, None], y, folds)
    if data.confidence is not None:
        out["confidence"] = cv_predict(make_probe, data.confidence, y, folds)
    return out


def random_direction_scores(X, y, folds, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(X.shape[1])
    return cv_predict(make_probe, (X @ (r / np.linalg.norm(r)))[:, None], y, folds)


def direction_of(model) -> dict:
    """The fitted probe as a direction in the original activation space: logit = norm * (u . x) + bias."""
    scaler, logistic = model[0], model[-1]
    coef = logistic.coef_[0] / scaler.scale_
    bias = float(logistic.intercept_[0] - np.sum(logistic.coef_[0] * scaler.mean_ / scaler.scale_))
    norm = float(np.linalg.norm(coef))
    return {"direction": (coef / norm).tolist(), "weight_norm": norm, "bias": bias,
            "scaler_mean": scaler.mean_.tolist(), "scaler_scale": scaler.scale_.tolist(),
            "coef_standardized": logistic.coef_[0].tolist(), "intercept_standardized": float(logistic.intercept_[0])}


def evaluate_cells(data: TrajectoryData, folds: int = 5, seed: int = 0, n_boot: int = 1000, permutations: int = 50,
                   C: float = 1.0, progress: bool = False) -> dict:
    """Every cell scored beside every baseline on the same folds; one permutation null shared by all cells
    (per-cell p-values and the family-wise max-statistic p); nested selection of the best cell."""
    y, groups = data.y, data.groups
    outer = ev.grouped_folds(y, groups, folds, seed)
    base = baseline_scores(data, outer)
    keys = sorted(data.features)
    fits = {key: FoldFits(data.features[key], outer, C) for key in keys}
    cells = []
    for key in tqdm(keys, desc="probing cells", disable=not progress):
        layer, agg = key
        X = data.features[key]
        prob = fits[key].predict(y)
        scores = {"probe": prob, **base, "random_direction": random_direction_scores(X, y, outer, seed)}
        boot = ev.bootstrap(y, scores, groups, n_boot, seed, paired_with="probe")
        paired = boot.pop("paired_auroc_difference")
        cells.append({
            "layer": int(layer), "aggregation": agg, "k": data.k if agg == "last_k" else None,
            "metrics": boot["probe"], "baselines": {n: boot[n] for n in scores if n != "probe"},
            "auroc_minus_baseline": paired, "beats": {name: bool(d["ci"][0] > 0) for name, d in paired.items()},
            "permutations": permutations, "oof_probability": prob.tolist(),
            **direction_of(make_probe(C).fit(X, y)),
        })
    null = permutation_null(y, groups, [fits[key] for key in keys], permutations, seed, progress)
    for j, cell in enumerate(cells):
        observed = cell["metrics"]["auroc"]["value"]
        cell["permutation_p"] = ev.permutation_pvalue(observed, null[:, j]) if permutations else float("nan")
        cell["beats"]["permutation"] = bool(cell["permutation_p"] < 0.05)
    selection = nested_selection(data, outer, C, seed, n_boot)
    best = max(range(len(cells)), key=lambda j: cells[j]["metrics"]["auroc"]["value"])
    selection["family_wise"] = {
        "method": f"max-statistic permutation test: under each of {permutations} grouped permutations, the best "
                  f"ROC-AUC of all {len(cells)} cells; p = share of permutations whose best reaches the observed best",
        "best_cell": {"layer": cells[best]["layer"], "aggregation": cells[best]["aggregation"]},
        "observed_best_auroc": cells[best]["metrics"]["auroc"]["value"], "permutations": permutations,
        "p": ev.permutation_pvalue(cells[best]["metrics"]["auroc"]["value"], null.max(axis=1)) if permutations
        else float("nan"),
    }
    selection["final"] = final_cell(cells, selection)
    return {"cells": cells, "selection": selection, "folds": folds, "n_boot": n_boot,
            "baselines_available": sorted(base) + ["random_direction", "permutation"],
            "notes": [] if data.confidence is not None else
            ["the store has no log-probs/entropies: the output-confidence baseline is skipped"]}


def permutation_null(y, groups, fits: list[FoldFits], permutations: int, seed: int, progress: bool) -> np.ndarray:
    """(permutations, cells) ROC-AUCs of every cell under the same grouped permutations of the labels."""
    rng = np.random.default_rng(seed + 7)
    null = np.zeros((permutations, len(fits)))
    for i in tqdm(range(permutations), desc="permutation null", disable=not progress or not permutations):
        perm = ev.permute_problems(y, groups, rng)
        null[i] = [ev.fast_metrics(perm, fit.predict(perm))["auroc"] for fit in fits]
    return null


def final_cell(cells: list[dict], selection: dict) -> dict:
    """The cell that directions and `score` use: the selection procedure refit on all problems, i.e. the cell
    with the best problem-grouped CV ROC-AUC over every problem. Says how many outer folds chose it."""
    best = max(cells, key=lambda c: c["metrics"]["auroc"]["value"])
    name = f"{best['layer']}/{best['aggregation']}"
    won = selection["chosen_per_fold"].get(name, 0)
    return {"layer": best["layer"], "aggregation": best["aggregation"], "folds_won": won,
            "folds": sum(selection["chosen_per_fold"].values()),
            "rule": "the selection refit on all problems: the cell with the highest problem-grouped CV ROC-AUC over "
                    "every problem"}


def nested_selection(data: TrajectoryData, outer, C: float, seed: int, n_boot: int) -> dict:
    """Choose the cell on each outer training part by inner grouped CV; score it on the untouched outer fold.
    Platt scaling, fit by inner grouped CV on the same training part, gives the calibrated predictions."""
    y, groups = data.y, data.groups
    prob, calibrated = np.zeros(len(y)), np.zeros(len(y))
    chosen = []
    for train, test in outer:
        inner_k = min(len(outer) - 1, len(np.unique(groups[train])))
        inner = ev.grouped_folds(y[train], groups[train], max(2, inner_k), seed + 1)
        best, best_auc = None, -1.0
        for key, X in sorted(data.features.items()):
            auc = ev.fast_metrics(y[train], FoldFits(X[train], inner, C).predict(y[train]))["auroc"]
            if auc > best_auc:
                best, best_auc = key, auc
        chosen.append(best)
        X = data.features[best]
        prob[test] = make_probe(C).fit(X[train], y[train]).predict_proba(X[test])[:, 1]
        platt = CalibratedClassifierCV(make_probe(C), method="sigmoid", cv=inner, ensemble=False)
        calibrated[test] = platt.fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    counts = {}
    for layer, agg in chosen:
        counts[f"{layer}/{agg}"] = counts.get(f"{layer}/{agg}", 0) + 1
    return {
        "method": f"nested problem-grouped CV: {len(outer)} outer folds, each choosing the cell by inner grouped CV "
                  "on its training problems only",
        "chosen_per_fold": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "folds_agree": len(counts) == 1,
        "nested_metrics": ev.bootstrap(y, {"probe": prob}, groups, n_boot, seed)["probe"],
        "calibration": ev.calibration(y, prob),
        "calibrated": {"method": "Platt scaling (CalibratedClassifierCV, method='sigmoid'), fit by inner grouped CV "
                                 "on each outer training part", "calibration": ev.calibration(y, calibrated),
                       "oof_probability": calibrated.tolist()},
        "oof_probability": prob.tolist(),
    }


def ungrouped_auroc(data: TrajectoryData, key, folds: int = 5, seed: int = 0, C: float = 1.0) -> float:
    """The leaky estimate (samples of a problem on both sides): for showing what grouping prevents."""
    from sklearn.model_selection import StratifiedKFold

    split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.y, data.y))
    return ev.metrics(data.y, cv_predict(lambda: make_probe(C), data.features[key], data.y, split))["auroc"]
