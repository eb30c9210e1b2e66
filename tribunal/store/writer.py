"""Append traces to a store shard with a commit protocol that survives kill -9.

Lifecycle (one small object, as a context manager): open -> append batches ->
close. `open` takes the writer lock, creates the file (as STORE.creating,
switched to HDF5 single-writer/multiple-reader (SWMR) mode, then renamed into
place) or opens an existing one directly in SWMR-write mode, checks it, and
truncates every dataset back to the committed offsets: every write to a store
at its final path happens in SWMR mode, whose ordered writes survive kill -9. Each `append` writes a whole batch and commits it:

    1. grow the token-axis datasets and write activations, token arrays, text
    2. grow the trace table and write its rows
    3. flush (data and metadata reach the file, in SWMR's safe order)
    4. write the commit record (traces, tokens, text bytes, commits); flush

Readers and reopening writers trust only the commit record, so a trace row
never points at unwritten activations and activations past the last commit
are discarded. See docs/store-format.md for why this design.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import IncompatibleStoreError, StoreError
from . import format as fmt
from .lock import WriterLock
from .superblock import is_hdf5, repair_after_crash

# HDF5 objects are written in the 1.10 formats (the oldest that has SWMR), so
# clusters with HDF5 1.10+ read the stores.
LIBVER = ("v110", "latest")


@dataclass
class TraceRecord:
    """One finished trace, ready to store. Activations are (n_layers, tokens, d_model) in store layer order.

    monitor: {field: float32 per token (len == len(token_ids)), NaN on prompt tokens}, for a store written with
    monitor_fields; exit: {exit_chunk, rule, score, thinking_tokens, forced_tokens}, for one with exit_table
    (docs/store-format.md, "Monitor scores and exit records")."""

    problem_id: int
    sample_index: int
    token_ids: np.ndarray
    prompt_length: int
    activations: np.ndarray
    label: str
    text: str = ""
    predicted: str | None = None
    gold: str | None = None
    finish_reason: str = "stop"
    logprobs: np.ndarray | None = None
    entropies: np.ndarray | None = None
    seed: int = 0
    monitor: dict | None = None
    exit: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(len(self.token_ids))


class StoreWriter:
    """Writer of one store shard. Refuses a store of another model, layer set, d_model, dtype or schema.

    durable=True (default) fsyncs the data before writing the commit record and the record after,
    so a commit record on disk never counts bytes that are not; durable=False leaves write-back to
    the OS, which is enough for process death (kill -9) and about twice as fast at small batches.
    See docs/store-format.md, "Durability", for what neither protects against.
    """

    def __init__(
        self,
        path,
        *,
        model_id: str,
        layers,
        d_model: int,
        dtype: str = "float16",
        model_revision: str = "unknown",
        generation_settings: dict | None = None,
        dataset_id: str = "",
        dataset_split: str = "",
        seed: int = 0,
        resume_identity: dict | None = None,
        chunk_tokens: int | None = None,
        compression: str | None = None,
        description: str = "",
        extra_attrs: dict | None = None,
        extra_datasets: dict | None = None,
        durable: bool = True,
        monitor_fields: tuple = (),
        exit_table: bool = False,
    ):
        if dtype not in fmt.DTYPES:
            raise StoreError(f"dtype {dtype!r} is not one of {sorted(fmt.DTYPES)}")
        layers = tuple(int(x) for x in layers)
        if not layers or len(set(layers)) != len(layers):
            raise StoreError(f"layers must be a non-empty list without repeats, got {list(layers)}")
        if int(d_model) <= 0:
            raise StoreError(f"d_model must be positive, got {d_model}")
        if compression not in (None, "gzip", "lzf"):
            raise StoreError(f"compression {compression!r} is not one of None, 'gzip', 'lzf'")
        self.monitor_fields = tuple(str(x) for x in monitor_fields)
        bad = [x for x in self.monitor_fields if not x or "/" in x or x.startswith(".")]
        if bad or len(set(self.monitor_fields)) != len(self.monitor_fields):
            raise StoreError(f"monitor_fields must be distinct plain names, got {list(self.monitor_fields)}")
        self.exit_table = bool(exit_table)
        self.path = Path(path)
        self.identity = fmt.StoreIdentity(
            model_id=str(model_id),
            layers=layers,
            d_model=int(d_model),
            dtype=dtype,
            model_revision=str(model_revision),
            extra=dict(resume_identity or {}),
        )
        self.chunk_tokens = int(chunk_tokens or fmt.default_chunk_tokens(int(d_model), dtype))
        self.compression = compression
        self._attrs = {
            "generation_settings": json.dumps(generation_settings or {}, sort_keys=True),
            "dataset_id": dataset_id,
            "dataset_split": dataset_split,
            "seed": int(seed),
            "description": description or "Per-token residual-stream activations of sampled chain-of-thought traces.",
            **(extra_attrs or {}),
        }
        self._extra_datasets = extra_datasets or {}
        self.durable = durable
        self._lock = WriterLock(self.path)
        self._file = None
        self._failed = None
        self._tails: dict = {}
        self._done: set[tuple[int, int]] = set()
        self.repairs: list[str] = []
        self.committed = dict.fromkeys(fmt.COMMIT_FIELDS, 0)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self):
        return self.open()

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def open(self) -> "StoreWriter":
        """Take the lock, create or repair the file, truncate to the last commit, start SWMR. A failed open
        leaves none of the folders it made for a new store."""
        made = _missing_folders(self.path.parent)
        try:
            return self._open()
        except BaseException:
            for folder in reversed(made):  # deepest first; a folder someone else filled meanwhile stays
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def _open(self) -> "StoreWriter":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of {self.path}: {exc.strerror}; choose another path") from None
        self._lock.acquire()
        try:
            existing = self.path.exists() and self.path.stat().st_size > 0
            if existing:
                self._open_existing()  # reads and checks only
            else:
                self._ensure_create_space()
                self._create()
            # From here on the file changes only in SWMR mode, whose ordered writes survive kill -9
            # (an existing store is opened in it; a new one switches before it gets its final name).
            if not self._file.swmr_mode:
                self._file.swmr_mode = True
            if existing:
                self.repairs += self._truncate_to_commit()
                self._flush()
            else:
                self._flush()
                os.replace(self._creating_path(), self.path)  # a new store appears whole, or not at all
            self._load_tails()
        except BaseException as exc:
            self._abandon_open(created=not existing)
            if not existing and isinstance(exc, (OSError, RuntimeError, ValueError)) and not isinstance(exc, StoreError):
                hint = "free disk space, then rerun" if _is_disk_full(exc) else "check the folder, then rerun"
                raise StoreError(f"cannot create {self.path} ({_short(exc)}); nothing was left behind: {hint}") from None
            raise
        return self

    def _abandon_open(self, created: bool) -> None:
        """After a failed open: close what is open (HDF5 may fail again, e.g. on a full disk), remove a
        half-made STORE.creating and release the lock, so nothing blocks the next run."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        if created:
            try:
                os.unlink(self._creating_path())
            except FileNotFoundError:
                pass
        self._lock.release()

    def _ensure_create_space(self) -> None:
        """Refuse to create a store on a nearly full disk, before HDF5 meets ENOSPC mid-way (its state is then
        broken): the empty structure takes a few KiB per dataset; ask for 1 MiB more than that."""
        datasets = len(fmt.core_datasets(self.identity.layers))
        self._require_free((1 << 20) + datasets * (16 << 10), "a new store", "free disk space, then rerun")

    def close(self) -> None:
        """Close the file (clearing its write flags) and release the lock. Safe to call twice."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                if self._failed is None:
                    raise
            self._file = None
        self._lock.release()

    # -- queries ---------------------------------------------------------------------------

    @property
    def n_traces(self) -> int:
        return int(self.committed["traces"])

    @property
    def n_tokens(self) -> int:
        return int(self.committed["tokens"])

    def committed_table(self) -> np.ndarray:
        """Rows of every committed trace (small: no activations)."""
        return self._file[fmt.TRACE_TABLE][: self.n_traces]

    def done_keys(self) -> set[tuple[int, int]]:
        """(problem_id, sample_index) of every committed trace, for resuming without duplicates."""
        return set(self._done)

    def problems_done(self) -> set[int]:
        """Problems whose every sample was tried (stored or not), from /problems: resume skips them."""
        return set(self._file[fmt.PROBLEMS][: int(self.committed["problems"])]["problem_id"].tolist())

    def label_counts(self) -> dict:
        """{label: committed traces} in the format's label order."""
        return fmt.count_labels(self.committed_table()["label"])

    # -- appending -------------------------------------------------------------------------

    def append(self, records, problems_done=()) -> None:
        """Write a batch of traces and commit it: all of it becomes visible, or none.

        problems_done: (problem_id, samples) of problems finished with this batch, so a resumed
        run skips them even when none of their traces was stored (a label's target was met).
        """
        if self._file is None:
            raise StoreError(f"{self.path} is not open for writing; use StoreWriter as a context manager")
        if self._failed is not None:
            raise StoreError(f"{self.path}: an earlier write failed ({self._failed}); reopen the store to resume")
        records, problems_done = list(records), list(problems_done)
        if not records and not problems_done:
            return
        prepared = [self._prepare(r) for r in records]
        self._check_unique(records)
        self._ensure_space(prepared)
        try:
            self._write_batch(records, prepared, problems_done)
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for a failed flush
            self._failed = str(exc)
            hint = "free disk space, then rerun to resume" if _is_disk_full(exc) else "rerun to resume"
            raise StoreError(
                f"writing {self.path} failed ({_short(exc)}); the store is intact up to its last commit "
                f"({self.n_traces} traces, {self.n_tokens} tokens): {hint}"
            ) from exc

    def _ensure_space(self, prepared) -> None:
        """Refuse a batch the disk cannot hold, before HDF5 sees a full disk.

        HDF5 survives ENOSPC inside a SWMR flush with the last commit intact, but
        its library state is then broken (h5py 3.16 / HDF5 2.0 segfaults at exit),
        so the writer checks first: the batch's bytes, a partial chunk per
        dataset and 1 MiB for metadata.
        """
        need = sum(p["activations"].nbytes + p["token_id"].nbytes * 4 + len(p["text"])
                   + sum(v.nbytes for v in p["monitor"].values()) for p in prepared)
        need += self._chunk_bytes() * len(self.identity.layers) + (1 << 20)
        self._require_free(need, "the next batch", f"the store is intact up to its last commit ({self.n_traces} "
                           "traces): free disk space, then rerun to resume")

    def _require_free(self, need: int, what: str, next_step: str) -> None:
        """Raise a one-line 'disk full' StoreError when the store's folder has fewer than `need` bytes free."""
        stat = os.statvfs(self.path.parent)
        free = stat.f_bavail * stat.f_frsize
        if free < need:
            raise StoreError(f"disk full: {self.path.parent} has {free:,} bytes free, {what} needs about {need:,}; "
                             f"{next_step}")

    def _chunk_bytes(self) -> int:
        return self.chunk_tokens * self.identity.d_model * fmt.DTYPES[self.identity.dtype][2]

    def _prepare(self, rec: TraceRecord) -> dict:
        n_layers, d_model = len(self.identity.layers), self.identity.d_model
        acts = rec.activations
        if isinstance(acts, (list, tuple)):
            acts = np.stack(acts)
        want = (n_layers, rec.n_tokens, d_model)
        if tuple(acts.shape) != want:
            raise StoreError(
                f"trace (problem {rec.problem_id}, sample {rec.sample_index}): activations have shape "
                f"{tuple(acts.shape)}, expected (layers, tokens, d_model) = {want}"
            )
        if rec.label not in fmt.LABEL_CODES:
            raise StoreError(f"label {rec.label!r} is not one of {list(fmt.LABELS)}")
        if rec.finish_reason not in fmt.FINISH_CODES:
            raise StoreError(f"finish_reason {rec.finish_reason!r} is not one of {list(fmt.FINISH_REASONS)}")
        if not 0 <= rec.prompt_length <= rec.n_tokens:
            raise StoreError(f"prompt_length {rec.prompt_length} is outside 0..{rec.n_tokens}")
        n_gen = rec.n_tokens - rec.prompt_length
        logprob = np.full(rec.n_tokens, np.nan, np.float32)
        entropy = np.full(rec.n_tokens, np.nan, np.float32)
        for name, values, out in (("logprobs", rec.logprobs, logprob), ("entropies", rec.entropies, entropy)):
            if values is None:
                continue
            values = np.asarray(values, np.float32)
            if values.shape != (n_gen,):
                raise StoreError(f"{name} has shape {values.shape}, expected one per generated token ({n_gen},)")
            out[rec.prompt_length :] = values
        is_generated = np.zeros(rec.n_tokens, bool)
        is_generated[rec.prompt_length :] = True
        return {
            "monitor": self._prepare_monitor(rec),
            "exit": self._prepare_exit(rec, n_gen),
            "activations": fmt.encode_activations(acts, self.identity.dtype),
            "token_id": np.asarray(rec.token_ids, np.int32),
            "is_generated": is_generated,
            "logprob": logprob,
            "entropy": entropy,
            "text": rec.text.encode("utf-8"),
        }

    def _prepare_monitor(self, rec: TraceRecord) -> dict:
        """The record's monitor arrays as float32, checked against the store's fields and the format's rules."""
        who = f"trace (problem {rec.problem_id}, sample {rec.sample_index})"
        given = tuple(sorted(rec.monitor or {}))
        if given != tuple(sorted(self.monitor_fields)):
            raise StoreError(f"{who} has monitor fields {list(given)}, but {self.path} stores "
                             f"{sorted(self.monitor_fields) or 'none'}; give every record the store's fields")
        out = {}
        for name in self.monitor_fields:
            values = np.asarray(rec.monitor[name], np.float32)
            if values.shape != (rec.n_tokens,):
                raise StoreError(f"{who}: monitor '{name}' has shape {values.shape}, expected one per token "
                                 f"({rec.n_tokens},), NaN on the prompt")
            if not np.isnan(values[: rec.prompt_length]).all():
                raise StoreError(f"{who}: monitor '{name}' has values on prompt tokens; they must be NaN")
            if name == fmt.CHUNK_PROBABILITY and np.any((values < 0) | (values > 1)):
                raise StoreError(f"{who}: monitor '{name}' holds values outside [0, 1]; store probabilities")
            out[name] = values
        return out

    def _prepare_exit(self, rec: TraceRecord, n_gen: int):
        """The record's exit as one row of fmt.EXIT_DTYPE, or None for a store without an exit table."""
        who = f"trace (problem {rec.problem_id}, sample {rec.sample_index})"
        if (rec.exit is not None) != self.exit_table:
            raise StoreError(f"{who} {'has' if rec.exit is not None else 'lacks'} an exit record, but {self.path} "
                             f"{'has' if self.exit_table else 'has no'} exit table; "
                             "give every record one exactly when the store has the table")
        if rec.exit is None:
            return None
        keys = set(rec.exit)
        if keys != set(fmt.EXIT_KEYS):
            raise StoreError(f"{who}: exit record has keys {sorted(keys)}, expected {list(fmt.EXIT_KEYS)}")
        e = rec.exit
        if e["rule"] not in fmt.EXIT_RULE_CODES:
            raise StoreError(f"{who}: exit rule {e['rule']!r} is not one of {list(fmt.EXIT_RULES)}")
        chunk, thinking, forced = int(e["exit_chunk"]), int(e["thinking_tokens"]), int(e["forced_tokens"])
        score = float("nan") if e["score"] is None else float(e["score"])
        row = np.array([(chunk, fmt.EXIT_RULE_CODES[e["rule"]], score, thinking, forced)], fmt.EXIT_DTYPE)
        problems = fmt.exit_problems(row, [n_gen])
        if problems:
            raise StoreError(f"{who}: exit record {problems[0][1]}")
        return row[0]

    def _check_unique(self, records) -> None:
        keys = [(int(r.problem_id), int(r.sample_index)) for r in records]
        clash = set(keys) & self._done
        if clash or len(set(keys)) != len(keys):
            dup = sorted(clash) or [k for k, n in Counter(keys).items() if n > 1]
            raise StoreError(f"(problem_id, sample_index) {dup[0]} is already in {self.path}; each pair is stored once")

    def _write_batch(self, records, prepared, problems_done) -> None:
        ds = self._open_datasets()
        tok0, trace0, text0 = self.n_tokens, self.n_traces, int(self.committed["text_bytes"])
        n_tok = sum(r.n_tokens for r in records)
        tok1 = tok0 + n_tok
        for i, layer in enumerate(self.identity.layers):
            if prepared:
                self._write_layer(ds[fmt.activation_path(layer)], layer, [p["activations"][i] for p in prepared], tok0, tok1)
        for name in fmt.TOKEN_ARRAYS:
            _append_rows(ds[f"{fmt.TOKENS}/{name}"], tok0, _concat([p[name] for p in prepared], fmt.TOKEN_ARRAYS[name]))
        for name in self.monitor_fields:
            _append_rows(ds[fmt.monitor_path(name)], tok0, _concat([p["monitor"][name] for p in prepared], np.float32))
        text = b"".join(p["text"] for p in prepared)
        _append_rows(ds[fmt.TRACE_TEXT], text0, np.frombuffer(text, np.uint8))

        rows = np.zeros(len(records), fmt.TRACE_DTYPE)
        pos, tpos = tok0, text0
        for j, (r, p) in enumerate(zip(records, prepared)):
            rows[j] = (
                fmt.trace_id(r.problem_id, r.sample_index),
                r.problem_id,
                r.sample_index,
                pos,
                pos + r.n_tokens,
                r.prompt_length,
                fmt.LABEL_CODES[r.label],
                _answer_bytes(r.predicted),
                _answer_bytes(r.gold),
                fmt.FINISH_CODES[r.finish_reason],
                tpos,
                tpos + len(p["text"]),
                r.seed,
            )
            pos += r.n_tokens
            tpos += len(p["text"])
        if self.exit_table:
            _append_rows(ds[fmt.TRACE_EXIT], trace0, np.array([p["exit"] for p in prepared], fmt.EXIT_DTYPE))
        _append_rows(ds[fmt.TRACE_TABLE], trace0, rows)
        prob0 = int(self.committed["problems"])
        _append_rows(ds[fmt.PROBLEMS], prob0, np.array([tuple(x) for x in problems_done], fmt.PROBLEM_DTYPE))
        self._flush()
        new = {
            "traces": trace0 + len(records),
            "tokens": tok1,
            "text_bytes": text0 + len(text),
            "problems": prob0 + len(problems_done),
            "commits": int(self.committed["commits"]) + 1,
        }
        ds[fmt.COMMIT].write(h5py.h5s.ALL, h5py.h5s.ALL, np.array([new[k] for k in fmt.COMMIT_FIELDS], np.int64))
        self._flush()
        self.committed = new
        self._done.update((int(r.problem_id), int(r.sample_index)) for r in records)

    def _write_layer(self, dsid, layer: int, parts, tok0: int, tok1: int) -> None:
        """Append rows tok0:tok1 of one layer.

        Uncompressed stores write whole chunks straight to the file (H5Dwrite_chunk): one copy,
        no pass through HDF5's chunk cache, which measured at under half the disk's rate. The
        rows of the last, partial chunk stay in a chunk-sized buffer (`_tails`) and that chunk is
        written at every commit, then rewritten whole once it fills.
        """
        if self.compression is not None:
            _append_rows(dsid, tok0, np.concatenate(parts))
            return
        dsid.set_extent((tok1, self.identity.d_model))
        chunk, buffer = self.chunk_tokens, self._tails[layer]
        filled = tok0 % chunk  # buffer holds rows first:tok0, those of the last, partial chunk
        first = tok0 - filled
        for part in parts:
            pos = 0
            while pos < len(part):
                take = min(chunk - filled, len(part) - pos)
                buffer[filled : filled + take] = part[pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == chunk:
                    dsid.write_direct_chunk((first, 0), buffer)
                    first, filled = first + chunk, 0
        if filled:  # rows past `filled` lie beyond the extent: never read, overwritten as the chunk fills
            dsid.write_direct_chunk((first, 0), buffer)

    def _open_datasets(self) -> dict:
        """Low-level handles of every dataset an append touches: a commit is a dozen small writes, and
        h5py's high-level path (name lookup, selection objects) costs more than the writes themselves.
        Opened afresh for each commit: handles kept open across commits led HDF5 to place a new chunk
        past the file's end-of-allocation ("addr overflow") in a store reopened after kill -9 (about one
        run in four of tests/store/test_writer.py::test_sigkill_at_random_moments); per-commit handles
        never did."""
        names = [fmt.TRACE_TABLE, fmt.TRACE_TEXT, fmt.PROBLEMS, fmt.COMMIT]
        names += [f"{fmt.TOKENS}/{name}" for name in fmt.TOKEN_ARRAYS]
        names += [fmt.activation_path(layer) for layer in self.identity.layers]
        names += [fmt.monitor_path(name) for name in self.monitor_fields]
        names += [fmt.TRACE_EXIT] if self.exit_table else []
        return {name: h5py.h5d.open(self._file.id, name.encode()) for name in names}

    def _load_tails(self) -> None:
        """A chunk buffer per layer holding the rows of its last, partial chunk, for the next append to complete."""
        n, chunk = self.n_tokens, self.chunk_tokens
        start = n - n % chunk
        self._tails = {}
        for layer in self.identity.layers:
            buffer = np.zeros((chunk, self.identity.d_model), fmt.DTYPES[self.identity.dtype][0])
            if n > start:
                buffer[: n - start] = self._file[fmt.activation_path(layer)][start:n]
            self._tails[layer] = buffer

    def _flush(self) -> None:
        """Hand everything to the OS (enough for kill -9); with durable=True also wait for the disk."""
        self._file.flush()
        if self.durable:
            os.fsync(self._file.id.get_vfd_handle())

    # -- creating and reopening ------------------------------------------------------------

    def _h5_open(self, mode, path=None):
        """h5py File for creating ("w") or appending ("r+").

        An existing store is opened straight into SWMR-write mode (h5py's File only offers SWMR for
        reading): opened plainly for write, its superblock would say "open for write, not SWMR" until
        the switch, and a kill in between would leave a file that SWMR readers refuse to open.
        """
        cache = dict(rdcc_nbytes=max(4 << 20, 4 * self._chunk_bytes()), rdcc_w0=1.0, rdcc_nslots=1021)
        if mode == "w":
            # exclusion is the sidecar flock's job (lock.py); HDF5's lock breaks on some cluster FS
            return h5py.File(path or self.path, "w", libver=LIBVER, locking=False, **cache)
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_LATEST)
        fapl.set_file_locking(False, True)
        fapl.set_cache(0, cache["rdcc_nslots"], cache["rdcc_nbytes"], cache["rdcc_w0"])
        fid = h5py.h5f.open(os.fsencode(self.path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl)
        return h5py.File(fid)

    def _creating_path(self) -> Path:
        return self.path.with_name(self.path.name + ".creating")

    def _create(self) -> None:
        """Build the whole structure in STORE.creating (renamed into place once in SWMR mode)."""
        self._file = self._h5_open("w", self._creating_path())
        for key, value in self._root_attrs().items():
            self._file.attrs[key] = value
        self._create_activations()
        self._create_tables()
        for name, data in self._extra_datasets.items():
            value, ds_attrs = data if isinstance(data, tuple) else (data, {})
            ds = self._file.create_dataset(name, data=value)
            for key, item in ds_attrs.items():
                ds.attrs[key] = item
        self._file.flush()

    def _root_attrs(self) -> dict:
        ident = self.identity
        return {
            "format": fmt.FORMAT_NAME, "schema_version": fmt.SCHEMA_VERSION, "model_id": ident.model_id,
            "model_revision": ident.model_revision, "layers": np.array(ident.layers, np.int32), "d_model": ident.d_model,
            "dtype": ident.dtype, "activation_encoding": fmt.DTYPES[ident.dtype][1],
            "resume_identity": json.dumps(ident.extra, sort_keys=True), "tribunal_version": __version__,
            "created": fmt.timestamp(), "host": socket.gethostname(), "chunk_tokens": self.chunk_tokens,
            "compression": self.compression or "none", "format_doc": fmt.FORMAT_DOC, **self._attrs,
        }

    def _create_activations(self) -> None:
        ident = self.identity
        disk_dtype, encoding, _ = fmt.DTYPES[ident.dtype]
        acts = self._file.create_group(fmt.ACTIVATIONS)
        acts.attrs["description"] = fmt.activations_description(ident.dtype)
        for layer in ident.layers:
            ds = acts.create_dataset(fmt.layer_name(layer), shape=(0, ident.d_model), maxshape=(None, ident.d_model),
                                     chunks=(self.chunk_tokens, ident.d_model), dtype=disk_dtype,
                                     compression=self.compression)
            ds.attrs.update(layer=layer, encoding=encoding, dtype=ident.dtype,
                            description=fmt.DESCRIPTIONS["layer"].format(layer=layer))

    def _create_tables(self) -> None:
        """The token arrays, the trace table and text, /problems and /commit, each described for h5dump."""
        f, describe = self._file, fmt.DESCRIPTIONS
        f.create_group(fmt.TOKENS).attrs["description"] = describe[fmt.TOKENS]
        for name, dtype in fmt.TOKEN_ARRAYS.items():
            ds = f.create_dataset(f"{fmt.TOKENS}/{name}", shape=(0,), maxshape=(None,), chunks=(1 << 16,), dtype=dtype)
            ds.attrs["description"] = describe[f"{fmt.TOKENS}/{name}"]
        f.create_group(fmt.TRACES).attrs["description"] = describe[fmt.TRACES]
        for name, dtype, chunk in ((fmt.TRACE_TABLE, fmt.TRACE_DTYPE, 1024), (fmt.TRACE_TEXT, np.uint8, 1 << 16),
                                   (fmt.PROBLEMS, fmt.PROBLEM_DTYPE, 4096)):
            ds = f.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(chunk,), dtype=dtype)
            ds.attrs["description"] = describe[name]
        commit = f.create_dataset(fmt.COMMIT, data=np.zeros(len(fmt.COMMIT_FIELDS), np.int64))
        commit.attrs.update(fields=list(fmt.COMMIT_FIELDS), description=describe[fmt.COMMIT])
        if self.monitor_fields:  # optional, and made now: nothing can be added to a file in SWMR mode
            f.create_group(fmt.MONITOR).attrs["description"] = describe[fmt.MONITOR]
            for name in self.monitor_fields:
                ds = f.create_dataset(fmt.monitor_path(name), shape=(0,), maxshape=(None,), chunks=(1 << 16,),
                                      dtype=np.float32, fillvalue=np.nan)
                ds.attrs["description"] = fmt.monitor_description(name)
        if self.exit_table:
            ds = f.create_dataset(fmt.TRACE_EXIT, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=fmt.EXIT_DTYPE)
            ds.attrs.update(description=describe[fmt.TRACE_EXIT], rules=list(fmt.EXIT_RULES))

    def _open_existing(self) -> None:
        if not is_hdf5(self.path):
            raise StoreError(f"{self.path} exists but is not an HDF5 file; choose another path or move it away")
        _refuse_foreign_hdf5(self.path)
        try:
            self.repairs = repair_after_crash(self.path)
            self._file = self._h5_open("r+")
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot open {self.path} for append: {_short(exc)}; if it was copied, copy it again in full"
            ) from None
        f = self._file
        attrs = f.attrs
        fmt.check_opened(f, self.path, action="append to")
        diffs = fmt.StoreIdentity.from_attrs(attrs).differences(self.identity)
        if diffs:
            raise IncompatibleStoreError(
                f"{self.path} was written with different settings ({'; '.join(diffs)}); "
                "use a new --out path or the store's own settings"
            )
        diffs = fmt.optional_differences(fmt.optional_datasets(f), (self.monitor_fields, self.exit_table))
        if diffs:
            raise IncompatibleStoreError(
                f"{self.path} was written with different settings ({'; '.join(diffs)}); "
                "use a new --out path or the store's own settings"
            )
        self.chunk_tokens = int(attrs["chunk_tokens"])
        values = f[fmt.COMMIT][:]
        self.committed = {k: int(v) for k, v in zip(fmt.COMMIT_FIELDS, values)}
        table = self.committed_table()
        self._done = set(zip(table["problem_id"].tolist(), table["sample_index"].tolist()))

    def _committed_sizes(self) -> dict:
        sizes = {fmt.TRACE_TABLE: self.n_traces, fmt.TRACE_TEXT: int(self.committed["text_bytes"]),
                 fmt.PROBLEMS: int(self.committed["problems"])}
        for name in fmt.TOKEN_ARRAYS:
            sizes[f"{fmt.TOKENS}/{name}"] = self.n_tokens
        for layer in self.identity.layers:
            sizes[fmt.activation_path(layer)] = self.n_tokens
        for name in self.monitor_fields:
            sizes[fmt.monitor_path(name)] = self.n_tokens
        if self.exit_table:
            sizes[fmt.TRACE_EXIT] = self.n_traces
        return sizes

    def _truncate_to_commit(self) -> list[str]:
        f, done = self._file, []
        optional = {fmt.monitor_path(name) for name in self.monitor_fields} | {fmt.TRACE_EXIT}
        for name, size in self._committed_sizes().items():
            ds = f[name]
            if name in optional and ds.shape[0] < size:  # appended to by a tribunal that did not know it
                raise StoreError(f"{self.path}: /{name} has {ds.shape[0]} rows, fewer than the {size} committed "
                                 "(an older tribunal appended without it); write to a new --out path")
            if ds.shape[0] != size:
                done.append(f"{name}: discarded {ds.shape[0] - size} uncommitted rows")
                ds.resize(size, axis=0)
        return done


def _refuse_foreign_hdf5(path: Path) -> None:
    """An HDF5 file that is not a tribunal store is refused as such before anything touches it (the crash
    repair would otherwise complain about its superblock version)."""
    try:
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            name = fmt.as_text(f.attrs.get("format", ""))
    except OSError:
        return  # unreadable as it is (e.g. write flags left by a killed writer): the repair path deals with it
    if name != fmt.FORMAT_NAME:
        raise StoreError(f"{path} is an HDF5 file but not a tribunal store; choose another path or move it away")


def _append_rows(dsid, start: int, rows: np.ndarray) -> None:
    """Grow a dataset to start + len(rows) along its first axis and write rows there (h5py's low-level API)."""
    if not len(rows):
        return
    shape = (start + len(rows), *rows.shape[1:])
    dsid.set_extent(shape)
    file_space = dsid.get_space()
    file_space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    dsid.write(h5py.h5s.create_simple(rows.shape), file_space, np.ascontiguousarray(rows))


def _concat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _answer_bytes(value) -> bytes:
    """At most ANSWER_BYTES of UTF-8, cut at a character boundary (never half a character); None is empty."""
    if value is None:
        return b""
    return str(value).encode("utf-8")[: fmt.ANSWER_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _missing_folders(folder: Path) -> list[Path]:
    """folder and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _is_disk_full(exc: Exception) -> bool:
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "quota" in str(exc).lower()


def _short(exc: Exception) -> str:
    """HDF5 errors are long stacks; keep the first line."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
