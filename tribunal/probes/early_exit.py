"""Early exit simulated on stored traces: stop at the first chunk whose score clears a threshold, answer with it.

Pure numpy over per-chunk arrays, so a hand-built case can be checked by hand. A trace's chunks are in
order; stopping after a chunk uses its end token + 1 generated tokens and answers with its intermediate
answer; a trace where no chunk clears the threshold runs to the end and answers as the full trace did.
The headline threshold is chosen on training folds only (nested): the largest token saving whose accuracy
on the training traces is no worse than their full-trace accuracy minus a stated margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import evaluation as ev
from .config import DEFAULTS

THRESHOLDS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2).tolist()) + (0.97, 0.99)
FRACTIONS = tuple(np.round(np.linspace(0.1, 1.0, 10), 2).tolist())


@dataclass
class ExitCase:
    """Chunks (in trace order) and traces: what a stop rule needs."""

    chunk_trace: np.ndarray  # trace index (0..T-1) of each chunk, non-decreasing
    chunk_tokens: np.ndarray  # generated tokens used when stopping after the chunk (its end token + 1)
    chunk_correct: np.ndarray  # the chunk's intermediate answer is correct
    trace_correct: np.ndarray  # the full trace's final answer is correct
    trace_tokens: np.ndarray  # the full trace's generated tokens
    trace_group: np.ndarray  # problem of each trace (resampled together)

    def first_chunk_at_or_above(self, score, tau: float) -> np.ndarray:
        """Per trace: index of its first chunk with score >= tau, or -1."""
        hit = np.asarray(score) >= tau
        first = np.full(len(self.trace_correct), -1)
        idx = np.flatnonzero(hit)
        traces, pos = np.unique(self.chunk_trace[idx], return_index=True)
        first[traces] = idx[pos]
        return first

    def outcome(self, stop_chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct, tokens used) per trace when each trace stops at `stop_chunk` (-1: runs to the end)."""
        stopped = stop_chunk >= 0
        correct = self.trace_correct.astype(bool).copy()
        tokens = self.trace_tokens.astype(float).copy()
        correct[stopped] = self.chunk_correct[stop_chunk[stopped]].astype(bool)
        tokens[stopped] = self.chunk_tokens[stop_chunk[stopped]]
        return correct, tokens

    def threshold_rule(self, score, tau: float):
        return self.outcome(self.first_chunk_at_or_above(score, tau))

    def first_answer_rule(self):
        return self.outcome(self.first_chunk_at_or_above(np.ones(len(self.chunk_trace)), 0.5))

    def fraction_rule(self, fraction: float):
        """Stop after `fraction` of each trace's tokens and answer with the last chunk ended by then (no such
        chunk: no answer, counted wrong); fraction 1 is the full trace."""
        if fraction >= 1:
            return self.trace_correct.astype(bool).copy(), self.trace_tokens.astype(float).copy()
        budget = np.ceil(fraction * self.trace_tokens)
        within = self.chunk_tokens <= budget[self.chunk_trace]
        last = np.full(len(self.trace_correct), -1)
        idx = np.flatnonzero(within)
        last[self.chunk_trace[idx]] = idx  # chunks are in order: the last write wins
        correct = np.zeros(len(self.trace_correct), bool)
        correct[last >= 0] = self.chunk_correct[last[last >= 0]].astype(bool)
        return correct, budget

    def subset(self, traces: np.ndarray) -> "ExitCase":
        """The case restricted to some traces (renumbered), e.g. one fold's training traces."""
        keep = np.isin(self.chunk_trace, traces)
        renumber = np.full(len(self.trace_correct), -1)
        renumber[traces] = np.arange(len(traces))
        return ExitCase(renumber[self.chunk_trace[keep]], self.chunk_tokens[keep], self.chunk_correct[keep],
                        self.trace_correct[traces], self.trace_tokens[traces], self.trace_group[traces])


def summary(correct, tokens, full_tokens) -> dict:
    return {"accuracy": float(np.mean(correct)), "tokens_used": float(np.sum(tokens) / np.sum(full_tokens)),
            "tokens_saved": float(1 - np.sum(tokens) / np.sum(full_tokens))}


def choose_threshold(case: ExitCase, score, margin: float = DEFAULTS.margin, grid=THRESHOLDS) -> float:
    """The threshold saving the most tokens at accuracy >= full accuracy - margin on this case; inf (never
    exit early) when none qualifies."""
    full = float(np.mean(case.trace_correct))
    best, best_saved = float("inf"), 0.0
    for tau in grid:
        correct, tokens = case.threshold_rule(score, tau)
        saved = 1 - tokens.sum() / case.trace_tokens.sum()
        if np.mean(correct) >= full - margin and saved > 0 and saved >= best_saved - 1e-12:
            best, best_saved = float(tau), max(saved, best_saved)  # ties: the highest, most cautious threshold
    return best


def choose_fraction(case: ExitCase, margin: float = DEFAULTS.margin, grid=FRACTIONS) -> float:
    full = float(np.mean(case.trace_correct))
    for fraction in sorted(grid):
        if np.mean(case.fraction_rule(fraction)[0]) >= full - margin:
            return float(fraction)
    return 1.0


def nested_outcome(case: ExitCase, trace_folds, choose, apply) -> tuple[np.ndarray, np.ndarray, list]:
    """Per trace (correct, tokens) when each test fold uses the setting chosen on its own training traces.

    trace_folds: [(train traces, test traces)]; choose(train_case, fold_index) -> setting (from training
    traces only); apply(setting, test_traces) -> (correct, tokens) for those traces."""
    correct = np.zeros(len(case.trace_correct), bool)
    tokens = np.zeros(len(case.trace_correct))
    chosen = []
    for k, (train, test) in enumerate(trace_folds):
        setting = choose(case.subset(train), k)
        chosen.append(setting)
        correct[test], tokens[test] = apply(setting, test)
    return correct, tokens, chosen


def interval_summary(correct, tokens, full_tokens, full_correct, groups) -> dict:
    """Accuracy, tokens saved and the accuracy change against the full traces, with 95% CIs from the
    problem-level influence terms of each ratio of sums (evaluation.ratio_interval)."""
    point = summary(correct, tokens, full_tokens)
    point["full_accuracy"] = float(np.mean(full_correct))
    point["accuracy_change"] = point["accuracy"] - point["full_accuracy"]
    ones = np.ones(len(correct))
    intervals = {"accuracy": ev.ratio_interval(np.asarray(correct, float), ones, groups),
                 "tokens_saved": ev.ratio_interval(np.asarray(full_tokens, float) - tokens, full_tokens, groups),
                 "accuracy_change": ev.ratio_interval(np.asarray(correct, float) - np.asarray(full_correct, float), ones,
                                                      groups)}
    for name, m in intervals.items():
        point[f"{name}_ci"] = m["ci"]
    return point
