"""Read one shard, many shards or a merged file as one store.

A shard is opened read-only in SWMR mode, so it can be read while its writer
runs (and after a writer was killed, before anyone repairs it). The reader
trusts only the commit record: it takes a snapshot of the committed counts when
it opens (and on `refresh()`) and never reads past them. Like a streaming
shard reader, it knows every trace's offsets from the small trace table
without touching activations.
"""

from __future__ import annotations

import glob
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import IncompatibleStoreError, OverlappingStoresError, StoreError
from . import format as fmt
from .superblock import is_hdf5, read_status

AGGREGATIONS = ("mean", "last", "last_k", "max", "mean_all")
DEFAULT_BLOCK_BYTES = 64 << 20
REDUCE_THREADS = 2  # reduce_blocks splits each block's rows over both cores
PIECE_BYTES = 1 << 20  # float32 rows a reducing thread decodes at a time: they stay in its core's cache


@dataclass
class Trace:
    """One committed trace without its activations. monitor ({field: float32 per token}) and exit (the exit
    record as a dict) are None in a store without them."""

    index: int
    trace_id: int
    problem_id: int
    sample_index: int
    label: str
    predicted: str
    gold: str
    finish_reason: str
    prompt_length: int
    token_ids: np.ndarray
    is_generated: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    text: str
    shard: str
    monitor: dict | None = None
    exit: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(len(self.token_ids))


class Shard:
    """One store file, opened read-only (SWMR), with a snapshot of its committed rows."""

    def __init__(self, path):
        self.path = Path(path)
        _check_readable(self.path)
        self.file = _open_for_reading(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)  # for os.preadv of uncompressed rows (read_rows)
        self._offsets: dict = {}
        attrs = self.file.attrs
        try:
            fmt.check_opened(self.file, self.path)
        except StoreError:
            self.close()
            raise
        self.attrs = {k: _plain(v) for k, v in attrs.items()}
        self.identity = fmt.StoreIdentity.from_attrs(attrs)
        self.monitor_fields, self.has_exit = fmt.optional_datasets(self.file)
        self.refresh()

    def refresh(self) -> None:
        """Take a new snapshot of what the writer has committed."""
        self._offsets = {}
        commit = self.file[fmt.COMMIT]
        if not self.file.swmr_mode:  # opened beside the user's own non-SWMR handle: a fixed snapshot
            self.committed = {k: int(v) for k, v in zip(fmt.COMMIT_FIELDS, commit[:])}
            self.table = self.file[fmt.TRACE_TABLE][: self.committed["traces"]]
            self._read_exit_table()
            return
        commit.refresh()
        self.committed = {k: int(v) for k, v in zip(fmt.COMMIT_FIELDS, commit[:])}
        table = self.file[fmt.TRACE_TABLE]
        table.refresh()
        self.table = table[: self.committed["traces"]]
        for name in fmt.TOKEN_ARRAYS:
            self.file[f"{fmt.TOKENS}/{name}"].refresh()
        self.file[fmt.TRACE_TEXT].refresh()
        self.file[fmt.PROBLEMS].refresh()
        for layer in self.identity.layers:
            self.file[fmt.activation_path(layer)].refresh()
        for name in self.monitor_fields:
            self.file[fmt.monitor_path(name)].refresh()
        if self.has_exit:
            self.file[fmt.TRACE_EXIT].refresh()
        self._read_exit_table()

    def _read_exit_table(self) -> None:
        self.exit_table = self.file[fmt.TRACE_EXIT][: self.n_traces] if self.has_exit else None

    @property
    def n_traces(self) -> int:
        return self.committed["traces"]

    @property
    def n_tokens(self) -> int:
        return self.committed["tokens"]

    def dataset(self, layer: int):
        if layer not in self.identity.layers:
            raise StoreError(f"layer {layer} is not in {self.path}; it has layers {list(self.identity.layers)}")
        return self.file[fmt.activation_path(layer)]

    def token_array(self, name: str, start: int = 0, end: int | None = None) -> np.ndarray:
        end = self.n_tokens if end is None else end
        return self.file[f"{fmt.TOKENS}/{name}"][start:end]

    def monitor_array(self, name: str, start: int = 0, end: int | None = None) -> np.ndarray:
        """Committed rows of /monitor/<name> (float32 per token)."""
        if name not in self.monitor_fields:
            raise StoreError(f"{self.path} has no monitor field {name!r}; it has {list(self.monitor_fields) or 'none'}")
        end = self.n_tokens if end is None else end
        return self.file[fmt.monitor_path(name)][start:end]

    def read_rows(self, layer: int, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Stored words of rows [start, end) of a layer, checked against the commit.

        Uncompressed stores (the default) are read with os.preadv straight from each chunk's address: 40% less CPU
        than HDF5's read of the same rows here, and outside h5py's global lock, which every h5py call of every
        thread waits on. Compressed stores are read by HDF5."""
        if not 0 <= start <= end <= self.n_tokens:
            raise StoreError(f"rows {start}:{end} are outside the committed 0:{self.n_tokens} of {self.path}")
        ds = self.dataset(layer)
        if out is None:
            out = np.empty((end - start, ds.shape[1]), ds.dtype)
        if end == start:
            return out
        chunk_offsets = self._chunk_offsets(layer)
        if chunk_offsets is None:
            ds.read_direct(out, np.s_[start:end], np.s_[0 : end - start])
            return out
        chunk_rows, row_bytes = ds.chunks[0], ds.shape[1] * ds.dtype.itemsize
        rows = out[: end - start].reshape(end - start, -1).view(np.uint8)
        for chunk in range(start // chunk_rows, (end - 1) // chunk_rows + 1):
            lo, hi = max(start, chunk * chunk_rows), min(end, (chunk + 1) * chunk_rows)
            offset = chunk_offsets[chunk] + (lo - chunk * chunk_rows) * row_bytes
            if os.preadv(self._fd, [rows[lo - start : hi - start]], offset) != (hi - lo) * row_bytes:
                raise StoreError(f"{self.path} ended inside layer {layer}'s rows {lo}:{hi}; copy it again in full")
        return out

    def _chunk_offsets(self, layer: int):
        """File offset of each activation chunk of a layer (chunk index -> bytes), or None where the rows are not
        plain bytes in the file (compressed or filtered, or a chunk not yet allocated). Kept until refresh()."""
        if layer not in self._offsets:
            ds = self.dataset(layer)
            offsets = None
            if ds.chunks is not None and ds.id.get_create_plist().get_nfilters() == 0:
                chunk_rows = ds.chunks[0]
                found = [ds.id.get_chunk_info_by_coord((row, 0)).byte_offset
                         for row in range(0, self.n_tokens, chunk_rows)]
                if None not in found:
                    offsets = np.array(found, np.int64)
            self._offsets[layer] = offsets
        return self._offsets[layer]

    def read_scattered(self, layer: int, rows) -> np.ndarray:
        """Stored words of the given committed rows (sorted, distinct) of a layer, e.g. one token per chunk end.

        Uncompressed stores (the default) are read like a memmap: each HDF5 chunk's address comes from the chunk
        index (`_chunk_offsets`) and only the wanted rows are touched. HDF5's own selection of thousands of single
        rows measured 15x slower than a memmap gather. Compressed stores fall back to HDF5 reads."""
        rows = np.asarray(rows, np.int64)
        ds = self.dataset(layer)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_tokens):
            raise StoreError(f"rows outside the committed 0:{self.n_tokens} of {self.path}")
        out = np.empty((len(rows), ds.shape[1]), ds.dtype)
        chunk_offsets = self._chunk_offsets(layer) if len(rows) else None
        if chunk_offsets is None:
            for lo in range(0, len(rows), 4096):
                out[lo : lo + 4096] = ds[rows[lo : lo + 4096]]
            return out
        chunk_rows, width = ds.chunks[0], ds.shape[1]
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        which = rows // chunk_rows
        for chunk in np.unique(which):
            block = np.frombuffer(mapped, ds.dtype, count=chunk_rows * width, offset=int(chunk_offsets[chunk]))
            pick = np.flatnonzero(which == chunk)
            out[pick] = block.reshape(chunk_rows, width)[rows[pick] - chunk * chunk_rows]
        return out

    def text(self, row) -> str:
        return self.file[fmt.TRACE_TEXT][int(row["text_start"]) : int(row["text_end"])].tobytes().decode("utf-8", "replace")

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()
            self.file = None
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """Several shards of one run read as one: global trace indices run shard after shard."""

    def __init__(self, shards: list[Shard], allow_overlap: bool = False):
        """allow_overlap=False refuses files that share a (problem, sample), e.g. a merged file read beside
        its own shards: every trace would count twice, and a probe's folds would leak. `verify` allows it
        only to report it."""
        if not shards:
            raise StoreError("no store files given")
        first = shards[0]
        for shard in shards[1:]:
            diffs = first.identity.differences(shard.identity, resume=False)
            diffs += fmt.optional_differences((first.monitor_fields, first.has_exit),
                                              (shard.monitor_fields, shard.has_exit))
            if diffs:
                raise IncompatibleStoreError(
                    f"{shard.path} does not match {first.path} ({'; '.join(diffs)}); read them separately"
                )
        self.shards = shards
        self.identity = first.identity
        self.monitor_fields = first.monitor_fields  # () when the store has no monitor scores
        self._index()
        if not allow_overlap and len(shards) > 1:
            overlap = self.overlapping_files()
            if overlap:
                (a, b), n = overlap[0]
                raise OverlappingStoresError(
                    f"{n} (problem, sample) pairs are in more than one shard ({a} and {b}): a merged file beside "
                    "its own shards, or shards of different runs; read either the shards or the merged file")

    def overlapping_files(self) -> list:
        """[((file_a, file_b), pairs in both)] for every two files that share (problem, sample) pairs."""
        ids, owner = self.table["trace_id"], self.shard_of_trace
        order = np.argsort(ids, kind="stable")
        same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        pairs = Counter((int(owner[order][i]), int(owner[order][i + 1])) for i in same)
        return [((str(self.shards[a].path), str(self.shards[b].path)), n) for (a, b), n in sorted(pairs.items())]

    def _index(self) -> None:
        counts = [s.n_traces for s in self.shards]
        self.trace_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.table = np.concatenate([s.table for s in self.shards]) if self.shards else None
        # one exit record per row of self.table (fmt.EXIT_DTYPE; rule codes name fmt.EXIT_RULES), or None
        self.exit_table = np.concatenate([s.exit_table for s in self.shards]) if self.shards[0].has_exit else None
        self.shard_of_trace = np.repeat(np.arange(len(self.shards)), counts)

    def refresh(self) -> None:
        for shard in self.shards:
            shard.refresh()
        self._index()

    # -- facts -----------------------------------------------------------------------------

    layers = property(lambda self: self.identity.layers, doc="Captured layers (tuple of ints), in store order.")
    d_model = property(lambda self: self.identity.d_model, doc="Width of every activation row.")
    dtype = property(lambda self: self.identity.dtype, doc="Stored type: 'float16', 'bfloat16' or 'float32'.")
    model_id = property(lambda self: self.identity.model_id, doc="The model whose activations these are.")

    @property
    def attrs(self) -> dict:
        return self.shards[0].attrs

    @property
    def interventions(self) -> list[tuple[str, dict]]:
        """(file, intervention) of each shard sampled under an intervention on the residual stream (`tribunal
        steer`'s arms, generation_settings.intervention): not the model's own behaviour."""
        out = []
        for shard in self.shards:
            settings = fmt.parse_json_text(shard.attrs.get("generation_settings")) or {}
            if isinstance(settings, dict) and settings.get("intervention"):
                out.append((str(shard.path), settings["intervention"]))
        return out

    @property
    def n_traces(self) -> int:
        return int(self.trace_offsets[-1])

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def problems_done(self) -> set:
        """(problem_id, samples) of every problem whose samples were all tried, over all shards (/problems)."""
        out = set()
        for shard in self.shards:
            rows = shard.file[fmt.PROBLEMS][: shard.committed["problems"]]
            out |= {(int(p), int(s)) for p, s in zip(rows["problem_id"], rows["samples"])}
        return out

    def label_counts(self) -> dict:
        """{label: traces} in the format's label order."""
        return fmt.count_labels(self.table["label"])

    @property
    def labels(self) -> np.ndarray:
        """Label names per trace ('correct', 'incorrect', 'unparsed')."""
        return np.array(fmt.LABELS, dtype=object)[self.table["label"].astype(int)]

    @property
    def lengths(self) -> np.ndarray:
        return (self.table["token_end"] - self.table["token_start"]).astype(np.int64)

    @property
    def generated_lengths(self) -> np.ndarray:
        return self.lengths - self.table["prompt_length"].astype(np.int64)

    def check_layers(self, layers) -> list[int]:
        layers = list(self.layers) if layers is None else [int(x) for x in layers]
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise StoreError(f"layer(s) {missing} are not in the store; it has layers {list(self.layers)}")
        return layers

    # -- traces ----------------------------------------------------------------------------

    def _locate(self, index: int) -> tuple[Shard, np.void]:
        if not 0 <= index < self.n_traces:
            raise StoreError(f"trace {index} does not exist; the store has traces 0..{self.n_traces - 1}")
        shard = self.shards[int(self.shard_of_trace[index])]
        return shard, self.table[index]

    def trace(self, index: int) -> Trace:
        shard, row = self._locate(index)
        start, end = int(row["token_start"]), int(row["token_end"])
        return Trace(
            index=index,
            trace_id=int(row["trace_id"]),
            problem_id=int(row["problem_id"]),
            sample_index=int(row["sample_index"]),
            label=fmt.LABELS[int(row["label"])],
            predicted=row["predicted"].decode("utf-8", "replace"),
            gold=row["gold"].decode("utf-8", "replace"),
            finish_reason=fmt.FINISH_REASONS[int(row["finish_reason"])],
            prompt_length=int(row["prompt_length"]),
            token_ids=shard.token_array("token_id", start, end),
            is_generated=shard.token_array("is_generated", start, end),
            logprobs=shard.token_array("logprob", start, end),
            entropies=shard.token_array("entropy", start, end),
            text=shard.text(row),
            shard=str(shard.path),
            monitor={name: shard.monitor_array(name, start, end) for name in self.monitor_fields} or None,
            exit=None if self.exit_table is None else exit_record(self.exit_table[index]),
        )

    def activations(self, layer: int, index: int) -> np.ndarray:
        """(tokens, d_model) float32 activations of one trace at one layer."""
        shard, row = self._locate(index)
        words = shard.read_rows(int(layer), int(row["token_start"]), int(row["token_end"]))
        decode = _decoder(self.dtype)
        return words if decode is None else decode(words, np.empty(words.shape, np.float32))

    # -- streaming -------------------------------------------------------------------------

    def block_rows(self, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
        """Rows per streamed block: a whole number of chunks, about block_bytes of stored words."""
        chunk = int(self.attrs.get("chunk_tokens", 256))
        row_bytes = self.d_model * fmt.DTYPES[self.dtype][2]
        return max(chunk, (int(block_bytes) // row_bytes) // chunk * chunk)

    def iter_blocks(self, layer: int, block_bytes: int = DEFAULT_BLOCK_BYTES, decode: bool = True):
        """Yield (shard_index, first_row, rows) over a layer's whole token axis in large sequential blocks.

        The next block is read in a background thread while the caller works on this one (the read
        releases the GIL: see `Shard.read_rows`), so disk and compute overlap;
        two block buffers are the whole memory cost. A yielded block is valid until the next iteration:
        copy it to keep it.
        """
        layer = self.check_layers([layer])[0]
        rows = self.block_rows(block_bytes)
        spans = [(s, start, min(start + rows, shard.n_tokens))
                 for s, shard in enumerate(self.shards) for start in range(0, shard.n_tokens, rows)]
        if not spans:
            return
        disk_dtype = fmt.DTYPES[self.dtype][0]
        buffers = [np.empty((rows, self.d_model), disk_dtype) for _ in range(min(2, len(spans)))]

        def read(i):
            s, start, end = spans[i]
            return self.shards[s].read_rows(layer, start, end, buffers[i % len(buffers)][: end - start])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, 0)
            for i, (s, start, _) in enumerate(spans):
                words = pending.result()
                if i + 1 < len(spans):
                    pending = pool.submit(read, i + 1)
                yield s, start, fmt.decode_activations(words, self.dtype) if decode else words

    def aggregate(self, layer: int, aggregations=("mean",), k: int = 10, block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict:
        """Per-trace aggregates of one layer in one sequential pass; memory is bounded by block_bytes.

        See `reduce_blocks` for the aggregations. Returns {aggregation: (n_traces, d_model) float32}.
        """
        blocks = self.iter_blocks(layer, block_bytes, decode=False)
        return reduce_blocks(blocks, self.table, self.trace_offsets, self.d_model, self.dtype, aggregations, k)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def exit_record(row) -> dict:
    """One row of an exit table as the dict a TraceRecord's exit holds (rule by name)."""
    return {"exit_chunk": int(row["exit_chunk"]), "rule": fmt.rule_name(int(row["rule"])), "score": float(row["score"]),
            "thinking_tokens": int(row["thinking_tokens"]), "forced_tokens": int(row["forced_tokens"])}


def reduce_blocks(blocks, table, trace_offsets, d_model: int, dtype: str, aggregations=("mean",), k: int = 10) -> dict:
    """Per-trace aggregates from (shard, first_row, stored words) blocks in file order; dtype is the store's.

    mean: mean over generated tokens; last: the last token; last_k: mean of the last k generated tokens;
    max: elementwise max over generated tokens; mean_all: mean over every token, prompt included.
    A trace with no generated token gets its last token for every aggregation.

    Each block is cut into segments (each trace's prompt, its generated tokens before the last k, and its
    last k); each segment is decoded to float32 once (`_decoder`), a cache-sized piece at a time, and
    summed (and its max taken, for max) while in cache (`_reduce_segments`). Every aggregation is a
    combination of those partial sums, so no row is decoded or summed twice. The segments of a block are
    shared out between REDUCE_THREADS threads (numpy releases the GIL), about equal rows each.
    """
    aggregations = tuple(aggregations)
    unknown = [a for a in aggregations if a not in AGGREGATIONS]
    if unknown:
        raise StoreError(f"unknown aggregation(s) {unknown}; choose from {list(AGGREGATIONS)}")
    if k < 1:
        raise StoreError(f"k must be at least 1, got {k}")
    n = len(table)
    starts = table["token_start"].astype(np.int64)
    ends = table["token_end"].astype(np.int64)
    gen = starts + table["prompt_length"].astype(np.int64)
    gen = np.where(gen >= ends, ends - 1, gen)  # no generated token: fall back to the last token
    tail = np.maximum(gen, ends - k)
    # segment kinds: 0 = prompt [start, gen), 1 = early generated [gen, tail), 2 = last k [tail, end)
    bounds = np.stack([starts, gen, tail, ends], axis=1)
    sums = np.zeros((3, n, d_model), np.float32)
    want_max = "max" in aggregations
    peak = np.full((n, d_model), -np.inf, np.float32) if want_max else None
    last = np.zeros((n, d_model), np.float32) if "last" in aggregations else None
    decode = _decoder(dtype)
    piece = max(1, PIECE_BYTES // (4 * d_model))  # rows decoded at a time, with a row for the running sum
    scratch = [np.empty((piece + 1, d_model), np.float32) for _ in range(REDUCE_THREADS)]  # one per thread
    with ThreadPoolExecutor(max_workers=REDUCE_THREADS) as pool:
        for s, first, block in blocks:
            stop = first + len(block)
            local = overlapping_traces(starts, ends, trace_offsets, s, first, stop)
            if not len(local):
                continue
            cut = np.clip(bounds[local], first, stop) - first  # (traces, 4) within the block
            seg_start, seg_end = cut[:, :3].ravel(), cut[:, 1:].ravel()
            kind = np.tile(np.arange(3), len(local))
            owner = np.repeat(local, 3)
            keep = seg_end > seg_start
            segments = list(zip(seg_start[keep].tolist(), seg_end[keep].tolist(), kind[keep].tolist(),
                                owner[keep].tolist()))
            rows_done = np.cumsum((seg_end - seg_start)[keep])
            splits = np.searchsorted(rows_done, rows_done[-1] * np.arange(1, REDUCE_THREADS) / REDUCE_THREADS) + 1
            parts = np.split(np.arange(len(segments)), splits)  # about equal rows per thread
            jobs = [pool.submit(_reduce_segments, block, decode, scratch[j], [segments[i] for i in part], want_max)
                    for j, part in enumerate(parts) if len(part)]
            for job in jobs:
                for part, t, total, top in job.result():
                    sums[part, t] += total
                    if top is not None:
                        np.maximum(peak[t], top, out=peak[t])
            if last is not None:
                ending = (ends[local] > first) & (ends[local] <= stop)
                rows = ends[local[ending]] - 1 - first
                last[local[ending]] = fmt.decode_activations(block[rows], dtype).astype(np.float32)
    prompt, early, final = sums
    n_prompt, n_early, n_final = (np.maximum(bounds[:, i + 1] - bounds[:, i], 0)[:, None] for i in range(3))
    out = {}
    for name in aggregations:
        if name == "mean":
            out[name] = (early + final) / np.maximum(n_early + n_final, 1)
        elif name == "mean_all":
            out[name] = (prompt + early + final) / np.maximum(n_prompt + n_early + n_final, 1)
        elif name == "last_k":
            out[name] = final / np.maximum(n_final, 1)
        elif name == "max":
            out[name] = peak
        else:
            out[name] = last
    return {name: np.asarray(v, np.float32) for name, v in out.items()}


def overlapping_traces(starts, ends, trace_offsets, shard: int, first: int, stop: int) -> np.ndarray:
    """Global indices of shard `shard`'s traces with rows in [first, stop) (starts/ends: rows within each shard)."""
    lo, hi = trace_offsets[shard], trace_offsets[shard + 1]
    return lo + np.flatnonzero((starts[lo:hi] < stop) & (ends[lo:hi] > first))


def _reduce_segments(block, decode, scratch, segments, want_max: bool) -> list:
    """(part, trace, sum, max or None) of each segment of a block of stored words.

    float32 words (decode None) are reduced where they lie. Others are decoded a piece of rows at a time into
    scratch[1:], a buffer small enough to stay in cache while the piece is summed and maxed; the running sum
    (then max) of the pieces before goes in scratch[0], so each reduction runs down the rows in the order a
    single pass over the whole segment would, and gives its bits."""
    out = []
    piece = len(scratch) - 1
    for start, end, part, t in segments:
        if decode is None:
            rows = block[start:end]
            out.append((part, t, rows.sum(axis=0), rows.max(axis=0) if want_max and part else None))
            continue
        total = top = None
        for lo in range(start, end, piece):
            n = min(piece, end - lo)
            decode(block[lo : lo + n], scratch[1 : n + 1])
            first = 1 if total is None else 0  # the first piece has no running sum before it
            if total is not None:
                scratch[0] = total
            total = scratch[first : n + 1].sum(axis=0)
            if want_max and part:
                if top is not None:
                    scratch[0] = top
                top = scratch[first : n + 1].max(axis=0)
        out.append((part, t, total, top))
    return out


def _decoder(dtype: str):
    """(words, out) -> out: float32 values of a store's words written into `out`, bit for bit what
    format.decode_activations (and numpy's float16 cast) give; None for float32, which needs none."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return _bfloat16_into
    return _float16_rebiased_into if _rebias_is_exact() else _float16_cast_into


def _bfloat16_into(words, out):
    np.left_shift(words, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def _float16_cast_into(words, out):
    out[...] = words
    return out


_F16_EXPONENT = 0x7C00  # all ones in a float16's exponent: inf or NaN
_F16_TO_F32_KEEP = np.int32(-0x70002000)  # 0x8FFFE000: the sign, and the exponent and mantissa bits, shifted by 13
_F16_TO_F32_SCALE = np.float32(2.0**112)  # rebias the exponent from 15 to 127 (subnormals come out exact too)


def _float16_rebiased_into(words, out):
    """numpy casts float16 to float32 one element at a time; three vectorized passes do it 4x faster here: shift
    the bits into float32 place, keep sign, exponent and mantissa, and multiply by 2**112 to rebias the exponent.
    Words holding an inf or NaN (which the multiply would make large finite numbers) take numpy's cast."""
    exponents = out.reshape(-1).view(np.uint16)[: words.size]  # out's memory, before the values land in it
    np.bitwise_and(words.reshape(-1).view(np.uint16), _F16_EXPONENT, out=exponents)
    if exponents.max(initial=0) == _F16_EXPONENT:
        return _float16_cast_into(words, out)
    bits = out.view(np.int32)
    np.left_shift(words.view(np.int16), 13, out=bits, dtype=np.int32)  # sign-extended: the sign lands in bit 31
    np.bitwise_and(bits, _F16_TO_F32_KEEP, out=bits)
    np.multiply(out, _F16_TO_F32_SCALE, out=out)
    return out


def _rebias_is_exact() -> bool:
    """False where the CPU flushes subnormal float32 inputs to zero (DAZ, set by code built with -ffast-math or
    by torch.set_flush_denormal), which would zero float16 subnormals in the multiply."""
    words = np.array([1, 0x8001, 0x3C00], np.uint16).view(np.float16)
    return _float16_rebiased_into(words, np.empty(3, np.float32)).tobytes() == words.astype(np.float32).tobytes()


def resolve_paths(specs) -> list[Path]:
    """Files from paths, globs and run folders (every *.h5 inside), in a stable order."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    paths: list[Path] = []
    for spec in specs:
        spec = str(spec)
        if any(ch in spec for ch in "*?["):
            found = sorted(glob.glob(spec))
            if not found:
                raise StoreError(f"no store files match {spec!r}")
            paths += [Path(p) for p in found]
        elif os.path.isdir(spec):
            found = sorted(Path(spec).glob("*.h5"))
            if not found:
                raise StoreError(f"{spec} is a folder with no *.h5 store files in it")
            paths += found
        else:
            paths.append(Path(spec))
    if not paths:
        raise StoreError("no store files given")
    return paths


def open_store(specs, allow_overlap: bool = False) -> Store:
    """Open one shard, a list or glob of shards, a run folder, or a merged file as one Store."""
    shards = []
    try:
        for path in resolve_paths(specs):
            shards.append(Shard(path))
        return Store(shards, allow_overlap=allow_overlap)
    except BaseException:
        for shard in shards:
            shard.close()
        raise


# How a reader opens a file: SWMR (follows a live writer; also opens files of the oldest format, e.g. after
# h5repack) without HDF5's lock (Lustre/GPFS). When this process already holds the file open through the
# user's own h5py.File, HDF5 insists on that handle's flags, so the reader takes the first that matches.
_READ_FLAGS = (dict(swmr=True, locking=False), dict(swmr=True), dict(), dict(locking=False))
_FLAG_MISMATCH = ("flag values don't match", "flag not the same")


def _open_for_reading(path: Path) -> h5py.File:
    first = None
    for flags in _READ_FLAGS:
        try:
            return h5py.File(path, "r", **flags)
        except OSError as exc:
            first = first or exc
            if not any(m in str(exc) for m in _FLAG_MISMATCH):
                break
    message = str(first).splitlines()[0]
    if any(m in message for m in _FLAG_MISMATCH):
        raise StoreError(f"cannot read {path}: this process holds it open in h5py for writing; close that handle "
                         "first (to read beside tribunal, use h5py.File(path, 'r', swmr=True, locking=False))") from None
    raise StoreError(f"cannot read {path}: {message}") from None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give the store files (or a glob) instead")
    if path.stat().st_size == 0:
        raise StoreError(f"{path} is empty (0 bytes): not a store; a writer may have died before its first commit")
    if not is_hdf5(path):
        raise StoreError(f"{path} is not an HDF5 file (no HDF5 signature); is this the right path?")
    status = read_status(path)
    if status["eof"] is not None and status["eof"] > status["size"]:
        # HDF5's SWMR reader would retry reading the missing metadata for minutes.
        raise StoreError(
            f"{path} is truncated ({status['size']:,} of {status['eof']:,} bytes); copy it again in full"
        )


def _plain(value):
    """Attribute values as plain Python (str, int, list) for summaries and JSON."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return fmt.parse_json_text(value)
