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
from tqdm import tqdm

from ..errors import TribunalError
from ..store.reader import AGGREGATIONS, DEFAULT_BLOCK_BYTES, Store
from . import evaluation as ev
from . import search
from .config import DEFAULTS
from .search import cv_predict, direction_of, make_probe

LABEL_POSITIVE = "correct"


@dataclass
class TrajectoryData:
    """Per-trace features and labels of the graded traces (unparsed ones are left out)."""

    y: np.ndarray
    groups: np.ndarray
    trace_index: np.ndarray
    lengths: np.ndarray
    confidence: np.ndarray | None
    features: dict = field(default_factory=dict)  # (layer, aggregation) -> (n, d_model) float32
    k: int = DEFAULTS.last_k


def load_trajectory_data(store: Store, layers=None, aggregations=AGGREGATIONS, k: int = DEFAULTS.last_k,
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


def evaluate_cells(data: TrajectoryData, folds: int = DEFAULTS.folds, seed: int = DEFAULTS.seed,
                   permutations: int = DEFAULTS.permutations, C: float = DEFAULTS.C, progress: bool = False) -> dict:
    """Every cell scored beside every baseline on the same folds; one permutation null shared by all cells
    (per-cell p-values and the family-wise max-statistic p); nested selection of the best cell."""
    y, groups = data.y, data.groups
    d = search.design(y, groups, folds, seed, permutations)
    base = baseline_scores(data, d.outer)
    keys = sorted(data.features)
    candidates, cells = [], []
    for key in tqdm(keys, desc=f"probing cells (each with {permutations} permutations)", disable=not progress):
        layer, agg = key
        X = data.features[key]
        cand = search.score_candidate(d, key, X, C)
        candidates.append(cand)
        scores = {**base, "random_direction": random_direction_scores(X, y, d.outer, seed)}
        paired = {name: ev.paired_auroc_difference(y, cand.oof, s, d.outer, groups, cand.refit["auroc"], d.refit_df)
                  for name, s in scores.items()}
        cells.append({
            "layer": int(layer), "aggregation": agg, "k": data.k if agg == "last_k" else None,
            "metrics": cand.metrics, "baselines": {name: ev.cv_metrics(y, s, d.outer, groups) for name, s in scores.items()},
            "auroc_minus_baseline": paired,
            "beats": {**{name: bool(v["ci"][0] > 0) for name, v in paired.items()},
                      "permutation": bool(cand.permutation_p < 0.05)},
            "permutations": permutations, "permutation_p": cand.permutation_p, "refit_variance": cand.refit,
            "oof_probability": cand.oof.tolist(), **direction_of(make_probe(C).fit(X, y)),
        })
    chosen = search.select(d, candidates, "cells")
    selection = nested_selection(data, d, chosen, keys, C)
    best = chosen["best"]
    selection["family_wise"] = {**chosen["family_wise"],
                                "best_cell": {"layer": cells[best]["layer"], "aggregation": cells[best]["aggregation"]}}
    selection["final"] = final_cell(cells, selection)
    notes = [] if data.confidence is not None else [
        "the store has no log-probs/entropies: the output-confidence baseline is skipped"]
    if not permutations:
        notes.append("--permutations 0: the CIs lack refitting's variance and are too narrow")
    return {"cells": cells, "selection": selection, "folds": folds, "intervals": ev.INTERVALS,
            "baselines_available": sorted(base) + ["random_direction", "permutation"], "notes": notes}


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


def nested_selection(data: TrajectoryData, d: search.Design, chosen: dict, keys: list, C: float) -> dict:
    """The selection procedure's held-out figures (search.select), with the calibration of its predictions and
    Platt scaling fit by inner grouped CV on each outer training part."""
    y = data.y
    prob, calibrated = chosen["oof_probability"], np.zeros(len(y))
    for (train, test), inner, j in zip(d.outer, d.inner, chosen["chosen"]):
        X = data.features[keys[j]]
        platt = CalibratedClassifierCV(make_probe(C), method="sigmoid", cv=inner, ensemble=False)
        calibrated[test] = platt.fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    counts = {}
    for layer, agg in (keys[j] for j in chosen["chosen"]):
        counts[f"{layer}/{agg}"] = counts.get(f"{layer}/{agg}", 0) + 1
    return {
        "method": f"nested problem-grouped CV: {len(d.outer)} outer folds, each choosing the cell by inner grouped CV "
                  "on its training problems only",
        "chosen_per_fold": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "folds_agree": len(counts) == 1,
        "nested_metrics": chosen["nested_metrics"], "refit_variance": chosen["refit"],
        "calibration": ev.calibration(y, prob),
        "calibrated": {"method": "Platt scaling (CalibratedClassifierCV, method='sigmoid'), fit by inner grouped CV "
                                 "on each outer training part", "calibration": ev.calibration(y, calibrated),
                       "oof_probability": calibrated.tolist()},
        "oof_probability": prob.tolist(),
    }
