"""How tribunal's numbers behave on data of a known truth, shaped like a run of yours.

Feature matrices, not stores: n problems x s samples, labels with problem-level difficulty (a problem's
samples tend to share their outcome), features with problem-level random effects in d dimensions, and
either nothing linking features to labels (the null) or a shift along one direction whose population
ROC-AUC is planted. Each simulated data set goes through tribunal's own folds, probe, estimator,
interval, permutation null and nested selection (tribunal.probes.search), as `tribunal probe` runs them;
the summary says how often the 95% CIs cover the truth, where the estimates centre, and how often the
permutation p-values fall below 0.05. Chunk data sets run the chunk probe and its early exit the same way.

    python -m tribunal.probes.simulation --problems 60 --samples 4 --dim 64 --sets 200
    python -m tribunal.probes.simulation --problems 60 --samples 4 --dim 16 --auroc 0.7
    python -m tribunal.probes.simulation --chunks --problems 60 --samples 4 --sets 100
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm
from tqdm import tqdm

from . import evaluation as ev
from . import search
from .chunk_probe import ChunkData, evaluate_chunk_layers
from .config import DEFAULTS

FRESH = 4000  # fresh problems scored by each fold model, for the population AUROC of the probe as fit


@dataclass
class Shape:
    """What a simulated data set looks like. difficulty_sd: the spread of problems' logit of being right
    (1.5: most problems mostly right or mostly wrong, as on GSM8K); effect_sd: the spread of problems'
    random effects in the features, per dimension, against within-problem noise of 1."""

    problems: int = 60
    samples: int = 4
    dim: int = 64
    cells: int = 2
    difficulty_sd: float = 1.5
    effect_sd: float = 1.0

    @property
    def noise_sd(self) -> float:
        """The features' total spread along any direction, between problems and within."""
        return float(np.sqrt(self.effect_sd ** 2 + 1))


def simulate(shape: Shape, rng, auroc: float = 0.5):
    """(features {cell: (n, dim)}, labels, problems, signal shift) of one data set. With auroc > 0.5, every
    cell's first dimension is shifted by the labels so that, across problems, a correct trace outscores an
    incorrect one along it with probability auroc: the best linear probe's population ROC-AUC."""
    difficulty = rng.normal(0, shape.difficulty_sd, shape.problems)
    p = 1 / (1 + np.exp(-difficulty))
    y = (rng.random((shape.problems, shape.samples)) < p[:, None]).astype(int).ravel()
    groups = np.repeat(np.arange(shape.problems), shape.samples)
    shift = shape.noise_sd * np.sqrt(2) * norm.ppf(auroc)
    features = {}
    for cell in range(shape.cells):
        X = rng.normal(0, shape.effect_sd, (shape.problems, shape.dim))[groups] + rng.normal(0, 1, (len(y), shape.dim))
        X[:, 0] += shift * (y - 0.5)
        features[cell] = X
    return features, y, groups, shift


def fitted_auroc(shape: Shape, features: dict, y, d: search.Design, rng, auroc: float) -> list[float]:
    """Per cell, the population AUROC of the fold models a CV scored (their mean over folds): exactly 0.5 under
    the null; with a signal, measured on FRESH new problems of one trace each."""
    if auroc == 0.5:
        return [0.5] * len(features)
    fresh, y_fresh, _, _ = simulate(Shape(FRESH, 1, shape.dim, shape.cells, shape.difficulty_sd, shape.effect_sd),
                                    rng, auroc)
    out = []
    for key, X in features.items():
        fits = search.FoldFeatures(X, d.outer)
        logits = fits.logits_of(fits.fit(y[:, None].astype(float)), fresh[key])
        out.append(float(np.mean([ev.auroc(y_fresh, z[:, 0]) for z in logits])))
    return out


def one_set(shape: Shape, seed: int, auroc: float = 0.5, folds: int = DEFAULTS.folds,
            permutations: int = DEFAULTS.permutations) -> dict:
    """One data set through the trajectory probe's search: every cell's CV ROC-AUC and CI and permutation p,
    the nested figure and CI, the family-wise p."""
    rng = np.random.default_rng(seed)
    features, y, groups, _ = simulate(shape, rng, auroc)
    while len(np.unique(y)) < 2:  # a data set with one class is refused by tribunal, as it should be: redraw
        features, y, groups, _ = simulate(shape, rng, auroc)
    d = search.design(y, groups, folds, seed, permutations)
    candidates = [search.score_candidate(d, key, X) for key, X in features.items()]
    chosen = search.select(d, candidates)
    fitted = fitted_auroc(shape, features, y, d, rng, auroc)
    return {"cells": [{"auroc": c.metrics["auroc"]["value"], "ci": c.metrics["auroc"]["ci"], "p": c.permutation_p,
                       "fitted": f} for c, f in zip(candidates, fitted)],
            "nested": {"auroc": chosen["nested_metrics"]["auroc"]["value"], "ci": chosen["nested_metrics"]["auroc"]["ci"]},
            "family_wise_p": chosen["family_wise"]["p"]}


def study(shape: Shape, auroc: float = 0.5, sets: int = 200, seed: int = 0, folds: int = DEFAULTS.folds,
          permutations: int = DEFAULTS.permutations, progress: bool = False) -> dict:
    """Coverage, centre and p-value figures over `sets` data sets. The truth a CI should cover is the
    planted auroc (0.5 under the null); for the cells also the population AUROC of the fold models
    themselves (mean_fitted_auroc, coverage_of_fitted: what cross-validation estimates, below the planted
    value by what fitting d dimensions on (K-1)/K of the problems loses)."""
    runs = [one_set(shape, seed + i, auroc, folds, permutations)
            for i in tqdm(range(sets), desc="simulated data sets", disable=not progress)]
    cells = [c for r in runs for c in r["cells"]]
    nested = [r["nested"] for r in runs]

    def figures(items):
        values = np.array([c["auroc"] for c in items])
        lo, hi = np.array([c["ci"] for c in items]).T
        return {"mean_auroc": float(values.mean()), "sd_auroc": float(values.std(ddof=1)),
                "coverage": float(np.mean((lo <= auroc) & (auroc <= hi))), "above": float(np.mean(lo > auroc)),
                "below": float(np.mean(hi < auroc)), "mean_ci_width": float(np.mean(hi - lo))}

    out = {"shape": asdict(shape), "planted_auroc": auroc, "sets": sets, "permutations": permutations,
           "cells": figures(cells), "nested": figures(nested)}
    fitted = np.array([c["fitted"] for c in cells])
    lo, hi = np.array([c["ci"] for c in cells]).T
    out["cells"]["mean_fitted_auroc"] = float(fitted.mean())
    out["cells"]["coverage_of_fitted"] = float(np.mean((lo <= fitted) & (fitted <= hi)))
    if permutations:
        out["cells"]["p_below_0.05"] = float(np.mean([c["p"] < 0.05 for c in cells]))
        out["family_wise_p_below_0.05"] = float(np.mean([r["family_wise_p"] < 0.05 for r in runs]))
    return out


def simulate_chunks(shape: Shape, rng, layers: int = 2):
    """A chunk data set with no chunk signal: 2-5 answering chunks per trace, the last one's answer the trace's;
    earlier ones right with a per-problem chance; features with problem random effects, independent of
    whether a chunk is right. Returns (ChunkData, {layer: features})."""
    difficulty = rng.normal(0, shape.difficulty_sd, shape.problems)
    rows = {k: [] for k in ("trace", "problem", "index", "start", "end", "y", "final", "n")}
    traces, trace_correct, trace_tokens, trace_problem = [], [], [], []
    t = 0
    for problem in range(shape.problems):
        p = 1 / (1 + np.exp(-difficulty[problem]))
        for _ in range(shape.samples):
            correct = bool(rng.random() < p)
            n = int(rng.integers(2, 6))
            ends = np.cumsum(rng.integers(20, 80, n))
            early = rng.random(n - 1) < p * 0.8
            labels = list(early) + [correct]
            for k in range(n):
                chunk = {"trace": t, "problem": problem, "index": k, "start": 0 if k == 0 else int(ends[k - 1]) + 1,
                         "end": int(ends[k]) - 1, "y": int(labels[k]), "n": n,
                         "final": float(k == n - 1 or (labels[k] and correct))}  # its answer is the trace's
                for key, value in chunk.items():
                    rows[key].append(value)
            traces.append(t)
            trace_correct.append(correct)
            trace_tokens.append(float(ends[-1] + rng.integers(0, 40)))
            trace_problem.append(problem)
            t += 1
    index, end, n_chunks = np.array(rows["index"]), np.array(rows["end"]), np.array(rows["n"])
    trace = np.array(rows["trace"])
    confidence = rng.random(len(index))
    data = ChunkData(
        trace=trace, problem=np.array(rows["problem"]), index=index, token_start=np.array(rows["start"]),
        token_end=end, answer=[""] * len(index), y=np.array(rows["y"]),
        baselines={"position": np.column_stack([index, (index + 1) / n_chunks,
                                                (end + 1) / np.array(trace_tokens)[trace]]),
                   "tokens_so_far": np.log1p(end + 1.0)[:, None], "confidence": confidence[:, None],
                   "equals_final": np.array(rows["final"])[:, None]},
        confidence=confidence, traces=np.array(traces), trace_correct=np.array(trace_correct),
        trace_tokens=np.array(trace_tokens), trace_problem=np.array(trace_problem))
    groups = data.problem
    features = {layer: rng.normal(0, shape.effect_sd, (shape.problems, shape.dim))[groups]
                + rng.normal(0, 1, (len(index), shape.dim)) for layer in range(layers)}
    return data, features


def chunk_study(shape: Shape, sets: int = 100, seed: int = 0, folds: int = DEFAULTS.folds,
                permutations: int = DEFAULTS.permutations, margin: float = DEFAULTS.margin,
                progress: bool = False) -> dict:
    """Null chunk data sets through the chunk probe and its early exit: how often the nested chunk CI covers
    0.5, and how often the summary claims the probe's exit rule saves tokens with no loss of accuracy."""
    covered, claims, values = [], [], []
    for i in tqdm(range(sets), desc="simulated chunk data sets", disable=not progress):
        data, features = simulate_chunks(shape, np.random.default_rng(seed + i))
        result = evaluate_chunk_layers(data, list(features), features.__getitem__, folds, seed + i, permutations,
                                       margin=margin)
        auc = result["selection"]["nested_metrics"]["auroc"]
        values.append(auc["value"])
        covered.append(auc["ci"][0] <= 0.5 <= auc["ci"][1])
        claims.append(result["early_exit"]["claim"])
    return {"shape": asdict(shape), "sets": sets, "mean_nested_auroc": float(np.mean(values)),
            "nested_coverage": float(np.mean(covered)), "early_exit_claims": float(np.mean(claims))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tribunal.probes.simulation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cells", type=int, default=2)
    parser.add_argument("--difficulty-sd", type=float, default=1.5)
    parser.add_argument("--effect-sd", type=float, default=1.0)
    parser.add_argument("--auroc", type=float, default=0.5, help="planted population ROC-AUC (0.5: the null)")
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--permutations", type=int, default=DEFAULTS.permutations)
    parser.add_argument("--folds", type=int, default=DEFAULTS.folds)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", action="store_true", help="null chunk data sets: chunk probe and early exit")
    args = parser.parse_args(argv)
    shape = Shape(args.problems, args.samples, args.dim, args.cells, args.difficulty_sd, args.effect_sd)
    if args.chunks:
        out = chunk_study(shape, args.sets, args.seed, args.folds, args.permutations, progress=True)
    else:
        out = study(shape, args.auroc, args.sets, args.seed, args.folds, args.permutations, progress=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
