"""Check every invariant of format v1 (`tribunal verify`): a list of problems, empty when all hold."""

from __future__ import annotations

import numpy as np

from ..errors import DamagedStoreError
from . import format as fmt
from .reader import DEFAULT_BLOCK_BYTES, Shard, Store, resolve_paths


def verify_files(specs, check_values: bool = True) -> dict:
    """`tribunal verify`: {'problems', 'files', 'traces', 'tokens'} for files, globs or run folders.

    A damaged file (a missing attribute or dataset) is one more failed invariant, listed in full, not an error
    that hides the other files' results.
    """
    problems, shards, paths = [], [], resolve_paths(specs)
    try:
        for path in paths:
            try:
                shards.append(Shard(path))
            except DamagedStoreError as exc:
                problems += [f"{path}: {p}" for p in exc.problems]
        store = Store(shards, allow_overlap=True) if shards else None
        if store is not None:
            problems += verify_store(store, check_values)
        return {"problems": problems, "files": len(paths), "traces": store.n_traces if store else 0,
                "tokens": store.n_tokens if store else 0}
    finally:
        for shard in shards:
            shard.close()


def verify_shard(shard: Shard, check_values: bool = True, block_bytes: int = DEFAULT_BLOCK_BYTES) -> list[str]:
    """Problems found in one shard's committed part (uncommitted rows are not an error)."""
    where = str(shard.path)
    problems = [f"{where}: {p}" for p in _dataset_problems(shard)]
    if problems:
        return problems
    problems += [f"{where}: {p}" for p in _table_problems(shard)]
    done = shard.file[fmt.PROBLEMS][: shard.committed["problems"]]["problem_id"]
    if len(np.unique(done)) != len(done):
        problems.append(f"{where}: /problems lists a problem more than once")
    if check_values:
        problems += _check_finite(shard, block_bytes)
    return problems


def _dataset_problems(shard: Shard) -> list[str]:
    """Missing attributes, and datasets of the wrong width or shorter than the commit says."""
    f, ident, problems = shard.file, shard.identity, []
    missing = [a for a in fmt.REQUIRED_ATTRS if a not in shard.attrs]
    if missing:
        problems.append(f"missing file attributes {missing}")
    for layer in ident.layers:
        ds = f[fmt.activation_path(layer)]
        if ds.shape[1:] != (ident.d_model,):
            problems.append(f"/{fmt.activation_path(layer)} has width {ds.shape[1:]}, d_model is {ident.d_model}")
    sizes = [(fmt.TRACE_TABLE, shard.n_traces), (fmt.TRACE_TEXT, shard.committed["text_bytes"]),
             (fmt.PROBLEMS, shard.committed["problems"])]
    sizes += [(f"{fmt.TOKENS}/{n}", shard.n_tokens) for n in fmt.TOKEN_ARRAYS]
    sizes += [(fmt.activation_path(layer), shard.n_tokens) for layer in ident.layers]
    sizes += [(fmt.monitor_path(name), shard.n_tokens) for name in shard.monitor_fields]
    sizes += [(fmt.TRACE_EXIT, shard.n_traces)] if shard.has_exit else []
    for name, need in sizes:
        if f[name].shape[0] < need:
            problems.append(f"/{name} has {f[name].shape[0]} rows, fewer than the {need} committed")
    return problems


def _table_problems(shard: Shard) -> list[str]:
    """The trace table against the token axis, the text, the labels, the ids and the token arrays."""
    t, problems = shard.table, []
    if not shard.n_traces:
        return problems
    n_tokens, n_text = shard.n_tokens, shard.committed["text_bytes"]
    starts, ends = t["token_start"].astype(np.int64), t["token_end"].astype(np.int64)
    if starts[0] != 0:
        problems.append(f"the first trace starts at token {starts[0]}, not 0")
    for i in np.flatnonzero(starts[1:] != ends[:-1])[:5]:
        problems.append(f"trace {i + 1} starts at {starts[i + 1]} but trace {i} ends at {ends[i]} (not contiguous)")
    for i in np.flatnonzero(ends <= starts)[:5]:
        problems.append(f"trace {i} has token range {starts[i]}:{ends[i]} (empty or reversed)")
    if ends[-1] != n_tokens:
        problems.append(f"traces end at token {ends[-1]} but {n_tokens} tokens are committed")
    tstart, tend = t["text_start"].astype(np.int64), t["text_end"].astype(np.int64)
    if tstart[0] != 0 or np.any(tstart[1:] != tend[:-1]) or np.any(tend < tstart) or tend[-1] != n_text:
        problems.append(f"text offsets are not contiguous within the {n_text} committed bytes")
    lengths, plen = ends - starts, t["prompt_length"].astype(np.int64)
    for i in np.flatnonzero((plen < 0) | (plen > lengths))[:5]:
        problems.append(f"trace {i} has prompt_length {plen[i]} outside its {lengths[i]} tokens")
    labels = t["label"].astype(int)
    for i in np.flatnonzero((labels < 0) | (labels >= len(fmt.LABELS)))[:5]:
        problems.append(f"trace {i} has label code {labels[i]}, not one of {list(fmt.LABEL_CODES.values())}")
    for i in np.flatnonzero(t["trace_id"] != fmt.trace_id(t["problem_id"], t["sample_index"]))[:5]:
        problems.append(f"trace {i} has trace_id {t['trace_id'][i]}, expected problem_id << {fmt.SAMPLE_BITS} | "
                        "sample_index")
    _, first, counts = np.unique(t["trace_id"], return_index=True, return_counts=True)
    for i in first[counts > 1][:5]:
        problems.append(f"(problem {t['problem_id'][i]}, sample {t['sample_index'][i]}) is stored more than once")
    expected = np.ones(shard.n_tokens, bool)  # generated tokens, from the table
    for s, p in zip(starts.tolist(), plen.tolist()):
        expected[s : s + p] = False
    return problems + _check_token_arrays(shard, expected) + _check_scores(shard, expected, lengths - plen)


def _check_scores(shard: Shard, generated, n_generated) -> list[str]:
    """Monitor scores NaN on the prompt (chunk probabilities within [0, 1]); exit records that add up."""
    problems = []
    for name in shard.monitor_fields:
        values = shard.monitor_array(name)
        scored = np.flatnonzero(~generated & ~np.isnan(values))
        if len(scored):
            problems.append(f"/{fmt.monitor_path(name)} has values on {len(scored)} prompt tokens (first at row "
                            f"{scored[0]}); prompt tokens are NaN")
        if name == fmt.CHUNK_PROBABILITY:
            outside = np.flatnonzero((values < 0) | (values > 1))
            if len(outside):
                problems.append(f"/{fmt.monitor_path(name)} has {len(outside)} values outside [0, 1] (first at row "
                                f"{outside[0]}: {values[outside[0]]})")
    if shard.has_exit:
        found = fmt.exit_problems(shard.exit_table, n_generated)
        problems += [f"trace {i}'s exit record {what}" for i, what in found[:5]]
        if len(found) > 5:
            problems.append(f"... and {len(found) - 5} more exit-record problems")
    return problems


def _check_token_arrays(shard: Shard, expected) -> list[str]:
    problems = []
    is_gen = shard.token_array("is_generated")
    wrong = np.flatnonzero(is_gen != expected)
    if len(wrong):
        problems.append(f"is_generated disagrees with prompt_length at {len(wrong)} tokens (first at {wrong[0]})")
    logprob = shard.token_array("logprob")
    if np.any(logprob[expected] > 1e-4):
        problems.append("some generated tokens have a log-prob above 0")
    entropy = shard.token_array("entropy")
    if np.any(entropy[expected] < -1e-4):
        problems.append("some generated tokens have a negative entropy")
    return problems


def _check_finite(shard: Shard, block_bytes: int) -> list[str]:
    problems = []
    store = Store([shard])
    for layer in shard.identity.layers:
        bad_rows = 0
        first_bad = None
        for _, first, block in store.iter_blocks(layer, block_bytes):
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad_rows += int((~finite).sum())
                if first_bad is None:
                    first_bad = first + int(np.flatnonzero(~finite)[0])
        if bad_rows:
            problems.append(f"{shard.path}: layer {layer} has NaN/Inf in {bad_rows} token rows (first at row {first_bad})")
    return problems


def verify_store(store: Store, check_values: bool = True) -> list[str]:
    """Problems in every shard, plus (problem, sample) pairs repeated across shards."""
    problems = []
    for shard in store.shards:
        problems += verify_shard(shard, check_values)
    for (a, b), n in store.overlapping_files():
        problems.append(f"{n} (problem, sample) pairs appear in more than one shard ({a} and {b}): a merged file "
                        "beside its own shards, or shards of different runs")
    return problems
