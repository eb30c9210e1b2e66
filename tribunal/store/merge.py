"""`tribunal merge`: many shards of one run -> one store file, by copy through the store writer.

A copy, not HDF5 virtual datasets: the merged file is self-contained (it survives the shards being
moved, archived or deleted, where a virtual dataset silently reads fill values once its sources
move), it is written with the same commit protocol (an interrupted merge resumes), and it passes
the same `verify`. Reading shards together needs no merge at all: every reader takes globs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import StoreError
from . import format as fmt
from .reader import open_store
from .writer import StoreWriter, TraceRecord

DEFAULT_MEMORY = 256 << 20
COPIES_PER_BATCH = 2  # a batch's activations are held as read (stacked per trace) and once more as the writer lays them out


def merge_stores(shards, out, progress: bool = True, memory_bytes: int = DEFAULT_MEMORY, problems=None,
                 subset: str | None = None) -> dict:
    """Copy every committed trace of `shards` (files or globs) into `out`; refuses incompatible shards.

    Batches are sized in bytes, not tokens, so the peak memory is about `memory_bytes` whatever the number of
    layers and the width (one trace larger than the budget is copied alone). problems: copy only these problem
    ids (`run --validate`'s two halves of a run, for transfer between them); subset: what they are, recorded in
    the `subset` attribute (docs/store-format.md) so reports name it.
    """
    out = Path(out)
    keep = None if problems is None else {int(p) for p in problems}
    if keep is not None and not subset:
        raise StoreError("a merge of some problems only needs a `subset` saying which ones")
    with open_store(shards) as store:
        if any(Path(s.path).resolve() == out.resolve() for s in store.shards):
            raise StoreError(f"{out} is one of the shards; merge into a new file")
        attrs = store.attrs
        settings = attrs.get("generation_settings") or {}
        if isinstance(settings, dict):
            settings = {**settings, "shard": "merged"}
        identity = fmt.StoreIdentity.from_attrs(store.shards[0].file.attrs)
        sources = [{"path": str(s.path), "size_bytes": s.size_bytes(), "traces": s.n_traces} for s in store.shards]
        writer = StoreWriter(
            out, model_id=store.model_id, model_revision=attrs.get("model_revision", "unknown"), layers=store.layers,
            d_model=store.d_model, dtype=store.dtype, generation_settings=settings,
            dataset_id=attrs.get("dataset_id", ""), dataset_split=attrs.get("dataset_split", ""),
            seed=int(attrs.get("seed", 0)), chunk_tokens=int(attrs["chunk_tokens"]),
            resume_identity={k: v for k, v in identity.extra.items() if k != "shard"} | {"merged_from": len(sources)}
            | ({"subset": subset} if keep is not None else {}),
            description=f"Merge of {len(sources)} shards of one tribunal run (tribunal merge); sources in attr merged_from."
            + (f" Only the traces of {subset} (attr subset)." if keep is not None else ""),
            extra_attrs={"merged_from": json.dumps(sources), **({"subset": subset} if keep is not None else {})},
            monitor_fields=store.monitor_fields, exit_table=store.exit_table is not None,
        )
        row_bytes = len(store.layers) * store.d_model * fmt.DTYPES[store.dtype][2]
        batch_limit = max(1, memory_bytes // (COPIES_PER_BATCH * row_bytes))
        with writer:
            done = writer.done_keys()
            batch, batch_tokens = [], 0
            for i in tqdm(range(store.n_traces), desc="merge", unit="trace", disable=not progress):
                row = store.table[i]
                if (int(row["problem_id"]), int(row["sample_index"])) in done or (
                        keep is not None and int(row["problem_id"]) not in keep):
                    continue
                n = int(row["token_end"] - row["token_start"])
                if batch and batch_tokens + n > batch_limit:
                    writer.append(batch)
                    batch, batch_tokens = [], 0
                batch.append(_record(store, i))
                batch_tokens += n
                if batch_tokens >= batch_limit:
                    writer.append(batch)
                    batch, batch_tokens = [], 0
            writer.append(batch)
            have = writer.problems_done()
            finished = sorted(p for p in store.problems_done() if p[0] not in have and (keep is None or p[0] in keep))
            if finished:
                writer.append([], problems_done=finished)
            return {"out": str(out), "traces": writer.n_traces, "tokens": writer.n_tokens, "shards": len(sources)}


def _record(store, i: int) -> TraceRecord:
    shard = store.shards[int(store.shard_of_trace[i])]
    t = store.trace(i)
    row = store.table[i]
    start, end = int(row["token_start"]), int(row["token_end"])
    words = np.stack([shard.read_rows(layer, start, end) for layer in store.layers])
    gen = t.is_generated
    return TraceRecord(
        problem_id=t.problem_id, sample_index=t.sample_index, token_ids=t.token_ids, prompt_length=t.prompt_length,
        activations=words, label=t.label, text=t.text, predicted=t.predicted, gold=t.gold,
        finish_reason=t.finish_reason, logprobs=t.logprobs[gen], entropies=t.entropies[gen], seed=int(row["seed"]),
        monitor=t.monitor, exit=t.exit,
    )
