"""How tribunal's numbers behave on data of a known truth, shaped like a run of yours.

Feature matrices, not stores: n problems x s samples, labels with problem-level difficulty (a problem's
samples tend to share their outcome), features with problem-level random effects in d dimensions, and
either nothing linking features to labels (the null) or a shift along one direction whose population
ROC-AUC is planted. Each simulated data set goes through tribunal's own folds, probe, estimator,
interval, permutation null and nested selection (tribunal.probes.search), as `tribunal probe` runs them;
the summary says how often the 95% CIs cover the truth, where the estimates centre, and how often the
permutation p-values fall below 0.05. Chunk data sets run the chunk probe and its early exit the same way,
with or without a planted chunk signal; each early-exit CI is checked against the population value of the
settings the folds chose, measured on fresh problems.

    python -m tribunal.probes.simulation --problems 60 --samples 4 --dim 64 --sets 200
    python -m tribunal.probes.simulation --problems 60 --samples 4 --dim 16 --auroc 0.7
    python -m tribunal.probes.simulation --chunks --problems 60 --samples 4 --sets 100
    python -m tribunal.probes.simulation --chunks --chunk-auroc 0.85 --problems 60 --samples 4 --sets 100
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm
from tqdm import tqdm

from . import early_exit as ee
from . import evaluation as ev
from . import search
from .chunk_probe import ChunkData, evaluate_chunk_layers
from .config import DEFAULTS

FRESH = 4000  # fresh problems scored by each fold model, for the population AUROC of the probe as fit
EXIT_RULES = ("probe", "confidence", "fixed_fraction", "first_answer")
EXIT_FIGURES = ("accuracy", "accuracy_change", "tokens_saved")


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


def simulate_chunks(shape: Shape, rng, layers: int = 2, chunk_auroc: float = 0.5):
    """A chunk data set: 2-5 answering chunks per trace, the last one's answer the trace's; earlier ones right
    with a per-problem chance; features with problem random effects. With chunk_auroc 0.5 (the null) features
    are independent of whether a chunk is right; above it, every layer's first dimension is shifted by the
    chunk's correctness so that the best linear probe's population ROC-AUC over chunks is chunk_auroc (as
    simulate plants a trace signal). Returns (ChunkData, {layer: features})."""
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
    shift = shape.noise_sd * np.sqrt(2) * norm.ppf(chunk_auroc)
    features = {}
    for layer in range(layers):
        X = (rng.normal(0, shape.effect_sd, (shape.problems, shape.dim))[groups]
             + rng.normal(0, 1, (len(index), shape.dim)))
        X[:, 0] += shift * (data.y - 0.5)
        features[layer] = X
    return data, features


def exit_case(data: ChunkData) -> ee.ExitCase:
    """The early exit's view of a simulated data set (its traces are numbered 0..T-1 in chunk order)."""
    return ee.ExitCase(chunk_trace=data.trace, chunk_tokens=data.token_end + 1.0, chunk_correct=data.y,
                       trace_correct=data.trace_correct, trace_tokens=data.trace_tokens, trace_group=data.trace_problem)


def fold_scores_on(features: dict, result: dict, d: search.Design, fresh: dict) -> list[np.ndarray]:
    """Per outer fold, the probabilities its probe gives the fresh chunks: the model of the layer that fold chose,
    fit on its training problems, i.e. the one that scored its held-out chunks (refit exactly as score_candidate
    fits it, in one batch with the permuted labels). Which layer a fold chose is read off the nested
    probabilities: the chosen layer's fold model reproduces them on the fold's test chunks."""
    labels = np.column_stack([d.y, d.permuted]).astype(float)
    nested = np.asarray(result["oof_probability"])
    models = {}
    for layer, X in features.items():
        fits = search.FoldFeatures(X, d.outer)
        thetas = [theta[:, :1] for theta in fits.fit(labels)]
        models[layer] = (fits.logits_of(thetas, X), fits.logits_of(thetas, fresh[layer]))
    out = []
    for k, (_, test) in enumerate(d.outer):
        gaps = {layer: np.abs(1 / (1 + np.exp(-own[k][test, 0])) - nested[test]).max()
                for layer, (own, _) in models.items()}
        layer = min(gaps, key=gaps.get)
        if gaps[layer] > 1e-6:
            raise RuntimeError(f"no layer's fold-{k} model reproduces the nested probabilities (gap {gaps[layer]:.2g})")
        out.append(1 / (1 + np.exp(-models[layer][1][k][:, 0])))
    return out


def exit_truth(data: ChunkData, features: dict, result: dict, d: search.Design, fresh_data: ChunkData,
               fresh_features: dict) -> dict:
    """What each early-exit figure estimates, given the settings the outer folds chose: per rule, every fold's
    threshold (or fraction) applied to fresh problems of the same distribution, scored as that fold scored its
    held-out problems, and averaged over folds weighted by their test traces (the estimator pools the traces)."""
    test_traces = [np.isin(data.trace_problem, np.unique(data.problem[te])).sum() for _, te in d.outer]
    weight = np.array(test_traces) / np.sum(test_traces)
    case, rules = exit_case(fresh_data), result["early_exit"]["rules"]
    probe_scores = fold_scores_on(features, result, d, fresh_features)
    per_fold = {
        "probe": [case.threshold_rule(score, tau)
                  for score, tau in zip(probe_scores, rules["probe"]["chosen_per_fold"])],
        "confidence": [case.threshold_rule(fresh_data.confidence, tau)
                       for tau in rules["confidence"]["chosen_per_fold"]],
        "fixed_fraction": [case.fraction_rule(f) for f in rules["fixed_fraction"]["chosen_per_fold"]],
        "first_answer": [case.first_answer_rule()] * len(d.outer),
    }
    full_accuracy = float(np.mean(case.trace_correct))
    truth = {}
    for name, outcomes in per_fold.items():
        figures = [ee.summary(correct, tokens, case.trace_tokens) for correct, tokens in outcomes]
        truth[name] = {"accuracy": float(weight @ [f["accuracy"] for f in figures]),
                       # per fold, then averaged: a rule that never exits changes accuracy by exactly 0
                       "accuracy_change": float(weight @ [f["accuracy"] - full_accuracy for f in figures]),
                       "tokens_saved": float(weight @ [f["tokens_saved"] for f in figures])}
    return truth


def one_chunk_set(shape: Shape, seed: int, chunk_auroc: float = 0.5, folds: int = DEFAULTS.folds,
                  permutations: int = DEFAULTS.permutations, margin: float = DEFAULTS.margin) -> dict:
    """One chunk data set through the chunk probe and its early exit: the nested chunk AUROC and CI, the claim,
    and per early-exit rule each figure, its CI and its truth (exit_truth on FRESH fresh problems)."""
    rng = np.random.default_rng(seed)
    data, features = simulate_chunks(shape, rng, chunk_auroc=chunk_auroc)
    result = evaluate_chunk_layers(data, list(features), features.__getitem__, folds, seed, permutations, margin=margin)
    fresh_shape = Shape(FRESH, 1, shape.dim, shape.cells, shape.difficulty_sd, shape.effect_sd)
    fresh_data, fresh_features = simulate_chunks(fresh_shape, rng, len(features), chunk_auroc)
    d = search.design(data.y, data.problem, folds, seed, permutations)  # the design evaluate_chunk_layers used
    truth = exit_truth(data, features, result, d, fresh_data, fresh_features)
    rules = result["early_exit"]["rules"]
    return {"nested": result["selection"]["nested_metrics"]["auroc"], "claim": result["early_exit"]["claim"],
            "rules": {name: {figure: {"value": rules[name][figure], "ci": rules[name][f"{figure}_ci"],
                                      "truth": truth[name][figure]} for figure in EXIT_FIGURES}
                      for name in EXIT_RULES}}


def chunk_study(shape: Shape, sets: int = 100, seed: int = 0, chunk_auroc: float = 0.5, folds: int = DEFAULTS.folds,
                permutations: int = DEFAULTS.permutations, margin: float = DEFAULTS.margin,
                progress: bool = False) -> dict:
    """Chunk data sets through the chunk probe and its early exit: how often the nested chunk CI covers the
    planted chunk AUROC (0.5: the null), how often the summary claims the probe's exit rule saves tokens with no
    loss of accuracy, and per rule and figure how often its 95% CI covers the population value of the settings
    the folds chose (coverage), with the mean estimate, truth and CI width, and the share of sets where the
    rule saves any tokens at all (exits_early) and the coverage in those sets alone."""
    runs = [one_chunk_set(shape, seed + i, chunk_auroc, folds, permutations, margin)
            for i in tqdm(range(sets), desc="simulated chunk data sets", disable=not progress)]
    values = np.array([r["nested"]["value"] for r in runs])
    lo, hi = np.array([r["nested"]["ci"] for r in runs]).T
    exit_ = {}
    for name in EXIT_RULES:
        exits = np.array([r["rules"][name]["tokens_saved"]["value"] > 0 for r in runs])
        exit_[name] = {"exits_early": float(exits.mean())}
        for figure in EXIT_FIGURES:
            items = [r["rules"][name][figure] for r in runs]
            value, truth = np.array([c["value"] for c in items]), np.array([c["truth"] for c in items])
            a, b = np.array([c["ci"] for c in items]).T
            covered = (a <= truth) & (truth <= b)
            exit_[name][figure] = {"coverage": float(covered.mean()),
                                   # where it never exits the figure is exact (0 change, 0 saved) and covered
                                   "coverage_when_exiting": float(covered[exits].mean()) if exits.any() else None,
                                   "mean": float(value.mean()), "mean_truth": float(truth.mean()),
                                   "mean_ci_width": float(np.mean(b - a))}
    return {"shape": asdict(shape), "sets": sets, "chunk_auroc": chunk_auroc, "mean_nested_auroc": float(values.mean()),
            "nested_coverage": float(np.mean((lo <= chunk_auroc) & (chunk_auroc <= hi))),
            "early_exit_claims": float(np.mean([r["claim"] for r in runs])), "early_exit": exit_}


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
    parser.add_argument("--chunks", action="store_true", help="chunk data sets: chunk probe and early exit")
    parser.add_argument("--chunk-auroc", type=float, default=0.5,
                        help="with --chunks: planted population ROC-AUC of the chunk signal (0.5: the null)")
    args = parser.parse_args(argv)
    shape = Shape(args.problems, args.samples, args.dim, args.cells, args.difficulty_sd, args.effect_sd)
    if args.chunks:
        out = chunk_study(shape, args.sets, args.seed, args.chunk_auroc, args.folds, args.permutations,
                          progress=True)
    else:
        out = study(shape, args.auroc, args.sets, args.seed, args.folds, args.permutations, progress=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
