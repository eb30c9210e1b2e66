"""Per-token probes fit out of core: every generated token labelled with its trace's outcome.

Two sequential passes over one layer, in blocks sized from a memory budget:
  1. on the training problems, exact streaming class sums, counts and the pooled
     scatter matrix -> the LDA direction (shrinkage-regularized) and the
     mass-mean direction (difference of class means);
  2. on the held-out problems, each token's projection; then ROC-AUC by
     relative position in the trace (how early does the signal tell?) and mean
     projection curves for correct and incorrect traces with 95% bands.
Peak memory is the blocks plus d_model^2 floats, never the store.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..errors import TribunalError
from ..store.reader import Store, overlapping_traces
from . import evaluation as ev
from .config import DEFAULTS

N_BINS = 10


# Measured: the interpreter with numpy, h5py, scikit-learn, scipy and matplotlib imported.
BASELINE_BYTES = 240 << 20


MIN_PROBLEMS = 4  # a problem-grouped held-out split needs problems on both sides of it, of both labels


def block_bytes_for(memory_bytes: int, d_model: int, dtype_bytes: int) -> int:
    """Stored bytes per block so that everything fits in memory_bytes.

    Per block: two stored buffers (the reader thread's double buffer), the gathered generated rows,
    and one float32 copy of them; besides, the d x d scatter (float64 accumulator, float32 product,
    the solve's copies) and the interpreter's baseline.
    """
    fixed = BASELINE_BYTES + 5 * d_model * d_model * 8
    room = memory_bytes - fixed
    per_stored_byte = 3 + 4 / dtype_bytes
    if room <= 0:
        raise TribunalError(f"--memory {memory_bytes >> 20} MB is too small for d_model {d_model}: give at least "
                            f"{(fixed >> 20) + 32} MB")
    return max(1 << 20, int(room / per_stored_byte))


def split_problems(groups, test_fraction: float, seed: int):
    """Held-out problems (all their samples) for testing; the rest for fitting."""
    uniq = np.unique(groups)
    if len(uniq) < MIN_PROBLEMS:
        raise TribunalError(f"{len(uniq)} problems are too few for a problem-grouped held-out split "
                            f"(need {MIN_PROBLEMS}+)")
    rng = np.random.default_rng(seed)
    test = rng.choice(uniq, max(1, int(round(len(uniq) * test_fraction))), replace=False)
    return np.isin(groups, test)


def fit_token_probe(store: Store, layer: int, memory_bytes: int = DEFAULTS.memory_bytes,
                    test_fraction: float = DEFAULTS.test_fraction, seed: int = DEFAULTS.seed, shrinkage: float = 1e-2,
                    progress: bool = False) -> dict:
    """Fit LDA and mass-mean directions on training problems' tokens; evaluate on held-out problems."""
    layer = store.check_layers([layer])[0]
    labels = store.labels
    graded = np.isin(labels, ["correct", "incorrect"])
    y_trace = (labels == "correct").astype(int)
    groups = store.table["problem_id"].astype(np.int64)
    if len(np.unique(y_trace[graded])) < 2:
        raise TribunalError("a token probe needs both correct and incorrect traces")
    is_test = split_problems(groups[graded], test_fraction, seed)
    test_trace = np.zeros(store.n_traces, bool)
    test_trace[np.flatnonzero(graded)[is_test]] = True
    train_trace = graded & ~test_trace
    if len(np.unique(y_trace[test_trace])) < 2 or len(np.unique(y_trace[train_trace])) < 2:
        raise TribunalError("the held-out split has one class on a side; generate more problems")
    block = block_bytes_for(memory_bytes, store.d_model, 2 if store.dtype != "float32" else 4)
    directions, midpoint, train_tokens = _fit_directions(store, layer, block, train_trace, y_trace, shrinkage,
                                                         progress)
    evaluated = _evaluate_directions(store, layer, block, test_trace, y_trace, groups, directions, midpoint, progress)
    return {
        "layer": layer, "method": "streaming class means and pooled covariance (LDA with shrinkage) and mass-mean",
        "midpoint": midpoint.tolist(), "shrinkage": shrinkage, "position_bins": N_BINS,
        "relative_position": "token's index among the trace's generated tokens / their count",
        "train_problems": int(len(np.unique(groups[train_trace]))), "test_problems": int(len(np.unique(groups[test_trace]))),
        "train_tokens": train_tokens, "test_tokens": evaluated["test_tokens"],
        "memory_bytes": int(memory_bytes), "block_bytes": int(block), "directions": evaluated["directions"],
    }


def _fit_directions(store: Store, layer: int, block: int, train_trace, y_trace, shrinkage: float, progress: bool):
    """Pass 1 over the training tokens: exact class sums and the raw scatter -> (LDA and mass-mean directions,
    the midpoint of the class means, training tokens)."""
    d = store.d_model
    sums = np.zeros((2, d))
    counts = np.zeros(2)
    scatter = np.zeros((d, d))
    for rows, trace_of_row, rel in _generated_rows(store, layer, block, train_trace, "token probe: fitting", progress):
        x = rows.astype(np.float32)
        lab = y_trace[trace_of_row].astype(np.float32)
        sums[1] += lab @ x
        sums[0] += (1 - lab) @ x
        counts += [len(lab) - lab.sum(), lab.sum()]
        scatter += x.T @ x  # float32 product per block, float64 accumulation across blocks
    means = sums / counts[:, None]
    # pooled within-class covariance from the raw scatter, in place (d x d matrices dominate memory)
    within = scatter
    for c in (0, 1):
        within -= counts[c] * np.outer(means[c], means[c])
    within /= counts.sum() - 2
    within[np.diag_indices(d)] += shrinkage * np.trace(within) / d
    lda = np.linalg.solve(within, means[1] - means[0])
    del within, scatter
    mass_mean = means[1] - means[0]
    directions = {"lda": lda / np.linalg.norm(lda), "mass_mean": mass_mean / np.linalg.norm(mass_mean)}
    return directions, (means[0] + means[1]) / 2, int(counts.sum())


def _evaluate_directions(store: Store, layer: int, block: int, test_trace, y_trace, groups, directions: dict,
                         midpoint, progress: bool) -> dict:
    """Pass 2 over the held-out tokens: projections, AUROC overall and by position, mean projection curves."""
    n_traces = store.n_traces
    result = {}
    proj_sums = {k: np.zeros((n_traces, N_BINS)) for k in directions}
    proj_counts = np.zeros((n_traces, N_BINS))
    token_scores = {k: [] for k in directions}
    token_labels, token_bins, token_groups = [], [], []
    for rows, trace_of_row, rel in _generated_rows(store, layer, block, test_trace, "token probe: held-out", progress):
        x = rows.astype(np.float32)
        bins = np.minimum((rel * N_BINS).astype(int), N_BINS - 1)
        np.add.at(proj_counts, (trace_of_row, bins), 1)
        for k, u in directions.items():
            p = x @ u.astype(np.float32) - float(midpoint @ u)
            np.add.at(proj_sums[k], (trace_of_row, bins), p)
            token_scores[k].append(p.astype(np.float32))
        token_labels.append(y_trace[trace_of_row].astype(np.int8))
        token_bins.append(bins.astype(np.int8))
        token_groups.append(groups[trace_of_row])
    y_tok = np.concatenate(token_labels)
    bins_tok = np.concatenate(token_bins)
    groups_tok = np.concatenate(token_groups)
    test_idx = np.flatnonzero(test_trace)
    for k, u in directions.items():
        s = np.concatenate(token_scores[k])
        overall = ev.heldout_metrics(y_tok, s, groups_tok)["auroc"]
        by_bin = []
        for b in range(N_BINS):
            sel = bins_tok == b
            auc = ev.heldout_metrics(y_tok[sel], s[sel], groups_tok[sel])["auroc"] \
                if len(np.unique(y_tok[sel])) == 2 else {"value": float("nan"), "ci": [float("nan")] * 2}
            by_bin.append(auc)
        per_trace = proj_sums[k][test_idx] / np.maximum(proj_counts[test_idx], 1)
        have = proj_counts[test_idx] > 0
        curves = {}
        for name, c in (("correct", 1), ("incorrect", 0)):
            rows_c = y_trace[test_idx] == c
            mean, lo, hi = [], [], []
            for b in range(N_BINS):
                vals = per_trace[rows_c & have[:, b], b]
                m = float(vals.mean()) if len(vals) else float("nan")
                half = float(1.96 * vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan")
                mean.append(m), lo.append(m - half), hi.append(m + half)
            curves[name] = {"mean": mean, "lower": lo, "upper": hi}
        result[k] = {"direction": u.tolist(), "auroc": overall, "auroc_by_position": by_bin, "projection_curves": curves}
    return {"directions": result, "test_tokens": int(len(y_tok))}


def _generated_rows(store: Store, layer: int, block_bytes: int, use_trace, desc: str, progress: bool):
    """(rows, trace index per row, relative position per row) for generated tokens of the chosen traces."""
    table = store.table
    starts = table["token_start"].astype(np.int64)
    ends = table["token_end"].astype(np.int64)
    gen_start = starts + table["prompt_length"].astype(np.int64)
    for s, first, block in tqdm(store.iter_blocks(layer, block_bytes), desc=desc, unit=" blocks", disable=not progress):
        last = first + len(block)
        local = overlapping_traces(starts, ends, store.trace_offsets, s, first, last)
        local = local[use_trace[local]]
        if not len(local):
            continue
        pieces, owners, rels = [], [], []
        for t in local.tolist():
            a, b = max(gen_start[t], first), min(ends[t], last)
            if a >= b:
                continue
            pieces.append(np.arange(a, b) - first)
            owners.append(np.full(b - a, t))
            rels.append((np.arange(a, b) - gen_start[t]) / max(ends[t] - gen_start[t], 1))
        if pieces:
            idx = np.concatenate(pieces)
            yield block[idx], np.concatenate(owners), np.concatenate(rels)
