"""The activation store's on-disk contract, format v1 (see docs/store-format.md).

Every name and constant that the writer, the reader and `verify` must agree on
lives here and nowhere else. This module never imports torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import DamagedStoreError, IncompatibleStoreError, StoreError

SCHEMA_VERSION = 1
FORMAT_NAME = "tribunal-activation-store"

# Groups and datasets.
ACTIVATIONS = "activations"
TOKENS = "tokens"
TRACES = "traces"
TRACE_TABLE = "traces/table"
TRACE_TEXT = "traces/text_utf8"
COMMIT = "commit"
PROBLEMS = "problems"
COMMIT_FIELDS = ("traces", "tokens", "text_bytes", "problems", "commits")
PROBLEM_DTYPE = np.dtype([("problem_id", "<i8"), ("samples", "<i4")])

# Optional datasets (a store has them when its writer was asked for them; older readers ignore them):
# per-token monitor scores on the token axis, and one exit record per trace, aligned with /traces/table.
MONITOR = "monitor"
TRACE_EXIT = "traces/exit"
CHUNK_PROBABILITY = "chunk_probability"
EXIT_RULES = ("none", "probe", "confidence")
EXIT_RULE_CODES = {name: code for code, name in enumerate(EXIT_RULES)}
EXIT_RULE_DTYPE = h5py.enum_dtype(EXIT_RULE_CODES, basetype="i1")
EXIT_DTYPE = np.dtype(
    [
        ("exit_chunk", "<i4"),
        ("rule", EXIT_RULE_DTYPE),
        ("score", "<f4"),
        ("thinking_tokens", "<i4"),
        ("forced_tokens", "<i4"),
    ]
)
EXIT_KEYS = EXIT_DTYPE.names

TOKEN_ARRAYS = {
    "token_id": np.dtype("int32"),
    "is_generated": np.dtype("bool"),
    "logprob": np.dtype("float32"),
    "entropy": np.dtype("float32"),
}

LABELS = ("incorrect", "correct", "unparsed")
LABEL_CODES = {name: code for code, name in enumerate(LABELS)}
FINISH_REASONS = ("stop", "length", "other")
FINISH_CODES = {name: code for code, name in enumerate(FINISH_REASONS)}

ANSWER_BYTES = 48

LABEL_DTYPE = h5py.enum_dtype(LABEL_CODES, basetype="i1")
FINISH_DTYPE = h5py.enum_dtype(FINISH_CODES, basetype="i1")

TRACE_DTYPE = np.dtype(
    [
        ("trace_id", "<i8"),
        ("problem_id", "<i8"),
        ("sample_index", "<i4"),
        ("token_start", "<i8"),
        ("token_end", "<i8"),
        ("prompt_length", "<i4"),
        ("label", LABEL_DTYPE),
        ("predicted", f"S{ANSWER_BYTES}"),
        ("gold", f"S{ANSWER_BYTES}"),
        ("finish_reason", FINISH_DTYPE),
        ("text_start", "<i8"),
        ("text_end", "<i8"),
        ("seed", "<u8"),
    ]
)

# Root attributes a reader needs to read the file at all; a store missing one is refused as damaged.
CORE_ATTRS = ("format", "schema_version", "model_id", "layers", "d_model", "dtype", "chunk_tokens")

FORMAT_DOC = "docs/store-format.md in the tribunal repository; read only rows < /commit"

# What `h5dump -H STORE` and HDFView show for each group and dataset.
DESCRIPTIONS = {
    "layer": "hidden state leaving decoder layer {layer} (0-based), rows = tokens",
    TOKENS: "token axis shared by every /activations dataset",
    f"{TOKENS}/token_id": "vocabulary id of the token",
    f"{TOKENS}/is_generated": "FALSE for prompt tokens, TRUE for sampled tokens",
    f"{TOKENS}/logprob": "log-probability of the sampled token (natural log); NaN for prompt tokens",
    f"{TOKENS}/entropy": "entropy (nats) of the sampling distribution at this token; NaN for prompt tokens",
    TRACES: "one row per trace in /traces/table; its text is /traces/text_utf8[text_start:text_end]",
    TRACE_TABLE: "token_start/token_end: rows of /tokens and /activations (end exclusive); the first prompt_length are "
                 "the prompt; label: outcome graded from the final answer; trace_id = problem_id << 20 | sample_index",
    TRACE_TEXT: "UTF-8 bytes of the generated texts, concatenated",
    PROBLEMS: "problems whose every sample was tried (stored or not: a label whose target was met is not stored); "
              "a resumed run skips them",
    MONITOR: "live-monitor scores, one float32 per token of /tokens (NaN where not scored: prompt tokens, and "
             "for chunk_probability every token but an answering chunk's last)",
    f"{MONITOR}/chunk_probability": "the chunk probe's probability (sigmoid of its logit) at the last token of each "
                                    "answering chunk, scored while sampling; NaN at every other token",
    f"{MONITOR}/token_score": "the token direction's score (direction . x - direction . midpoint) at each generated "
                              "token, scored while sampling; NaN for prompt tokens",
    TRACE_EXIT: "one row per trace of /traces/table (same order): exit_chunk = answering chunk (0-based) at whose end "
                "the early-exit rule fired, -1 = ran to the end; rule = which rule fired (none = no exit); score = "
                "the rule's value there (NaN if none); thinking_tokens = generated tokens up to and including the exit "
                "chunk's last token (all if none); forced_tokens = tokens appended after the exit (end-of-thinking "
                "marker, answer cue, answer); thinking_tokens + forced_tokens = the trace's generated tokens",
    COMMIT: "committed counts: traces, tokens, text bytes, problems, commits. Rows past these counts are uncommitted "
            "and are discarded on the next open for append",
}


def monitor_description(field: str) -> str:
    return DESCRIPTIONS.get(f"{MONITOR}/{field}", f"live-monitor score '{field}' at each token; NaN where not scored")


def monitor_path(field: str) -> str:
    return f"{MONITOR}/{field}"


def optional_datasets(h5file) -> tuple[tuple, bool]:
    """(monitor fields, has an exit table) of an open store: what its optional datasets are."""
    fields = tuple(sorted(h5file[MONITOR].keys())) if MONITOR in h5file else ()
    return fields, TRACE_EXIT in h5file


def optional_differences(mine: tuple, theirs: tuple) -> list[str]:
    """'monitor fields: store has [...], asked [...]' / 'exit table: ...' for two (fields, exit) pairs."""
    out = []
    if tuple(sorted(mine[0])) != tuple(sorted(theirs[0])):
        out.append(f"monitor fields: store has {sorted(mine[0])}, asked {sorted(theirs[0])}")
    if bool(mine[1]) != bool(theirs[1]):
        out.append(f"exit table: store has {'one' if mine[1] else 'none'}, asked {'one' if theirs[1] else 'none'}")
    return out


def exit_problems(rows: np.ndarray, generated) -> list[tuple[int, str]]:
    """(row index, what is wrong) for exit records (EXIT_DTYPE rows) against their traces' generated token
    counts: rule none exactly when exit_chunk is -1, token counts that add up, none negative. The writer
    refuses such a record; `verify` reports it."""
    chunk, rule = rows["exit_chunk"].astype(np.int64), rows["rule"].astype(np.int64)
    thinking, forced = rows["thinking_tokens"].astype(np.int64), rows["forced_tokens"].astype(np.int64)
    generated = np.asarray(generated, np.int64)
    checks = [
        ((rule < 0) | (rule >= len(EXIT_RULES)), lambda i: f"has rule code {rule[i]}, not one of "
                                                           f"{list(EXIT_RULE_CODES.values())}"),
        ((rule == EXIT_RULE_CODES["none"]) != (chunk == -1),
         lambda i: f"has rule {rule_name(rule[i])!r} with exit_chunk {chunk[i]} (rule 'none' exactly when -1)"),
        ((rule == EXIT_RULE_CODES["none"]) & (forced != 0),
         lambda i: f"has rule 'none' with forced_tokens {forced[i]} (a trace that did not exit has none forced)"),
        (chunk < -1, lambda i: f"has exit_chunk {chunk[i]} (a chunk index, or -1 for no exit)"),
        ((thinking < 0) | (forced < 0), lambda i: f"has negative token counts (thinking_tokens {thinking[i]}, "
                                                  f"forced_tokens {forced[i]})"),
        (thinking + forced != generated, lambda i: f"counts thinking_tokens {thinking[i]} + forced_tokens {forced[i]} "
                                                   f"= {thinking[i] + forced[i]}, but the trace has {generated[i]} "
                                                   "generated tokens"),
    ]
    return [(int(i), say(i)) for bad, say in checks for i in np.flatnonzero(bad)]


def rule_name(code) -> str:
    return EXIT_RULES[code] if 0 <= code < len(EXIT_RULES) else str(code)


def activations_description(dtype: str) -> str:
    encoding = DTYPES[dtype][1]
    return ("Residual stream leaving each decoder layer, one row per token of /tokens; "
            f"values are {encoding}" + (" (bfloat16 bit patterns: shift left 16 and read as float32)"
                                        if dtype == "bfloat16" else ""))


# Attributes every store carries at the root; `verify` checks them.
REQUIRED_ATTRS = (
    "format",
    "schema_version",
    "model_id",
    "model_revision",
    "layers",
    "d_model",
    "dtype",
    "activation_encoding",
    "generation_settings",
    "dataset_id",
    "dataset_split",
    "seed",
    "tribunal_version",
    "created",
    "host",
    "chunk_tokens",
    "compression",
    "description",
    "format_doc",
    "resume_identity",
)

# dtype name -> (numpy dtype stored on disk, encoding attribute, bytes per value)
DTYPES = {
    "float16": (np.dtype("<f2"), "ieee-float16", 2),
    "bfloat16": (np.dtype("<u2"), "bfloat16-bits-in-uint16", 2),
    "float32": (np.dtype("<f4"), "ieee-float32", 4),
}

# Chunk rows are chosen so one chunk is about this many bytes, within these row bounds
# (measured in bench/bench_store.py; docs/store-format.md says why).
TARGET_CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 16, 2048


def core_datasets(layers) -> list[str]:
    """Every dataset a reader needs, for a store with these layers."""
    names = [COMMIT, PROBLEMS, TRACE_TABLE, TRACE_TEXT] + [f"{TOKENS}/{name}" for name in TOKEN_ARRAYS]
    return names + [activation_path(layer) for layer in layers]


def schema_problems(h5file) -> list[str]:
    """What keeps an open tribunal HDF5 file from being read: missing or malformed core attributes and
    datasets, one sentence each (empty when it is readable). The reader, the writer and `verify` share it."""
    attrs, problems = h5file.attrs, []
    for name in CORE_ATTRS:
        if name not in attrs:
            problems.append(f"root attribute '{name}' is missing")
    layers = ()
    if "layers" in attrs:
        try:
            layers = tuple(int(x) for x in np.atleast_1d(attrs["layers"]))
            if not layers:
                problems.append("root attribute 'layers' is empty")
        except (TypeError, ValueError):
            problems.append(f"root attribute 'layers' is {_plain_attr(attrs['layers'])!r}, not a list of layer indices")
    for name, check in (("d_model", lambda v: int(v) > 0), ("chunk_tokens", lambda v: int(v) > 0),
                        ("dtype", lambda v: as_text(v) in DTYPES)):
        if name in attrs:
            try:
                ok = check(attrs[name])
            except (TypeError, ValueError):
                ok = False
            if not ok:
                problems.append(f"root attribute '{name}' has the invalid value {_plain_attr(attrs[name])!r}")
    for name in core_datasets(layers):
        if name not in h5file:
            problems.append(f"dataset /{name} is missing")
    if COMMIT in h5file and h5file[COMMIT].shape != (len(COMMIT_FIELDS),):
        problems.append(f"dataset /{COMMIT} has shape {h5file[COMMIT].shape}, not ({len(COMMIT_FIELDS)},)")
    if TRACE_TABLE in h5file:
        missing = [c for c in TRACE_DTYPE.names if c not in (h5file[TRACE_TABLE].dtype.names or ())]
        if missing:
            problems.append(f"dataset /{TRACE_TABLE} lacks the columns {missing}")
    if TRACE_EXIT in h5file:
        missing = [c for c in EXIT_KEYS if c not in (h5file[TRACE_EXIT].dtype.names or ())]
        if missing:
            problems.append(f"dataset /{TRACE_EXIT} lacks the columns {missing}")
    return problems


def _plain_attr(value):
    return value.tolist() if isinstance(value, np.ndarray) else as_text(value) if isinstance(value, bytes) else value


SAMPLE_BITS = 20  # trace_id = problem_id << SAMPLE_BITS | sample_index


def trace_id(problem_id, sample_index):
    """Stable across shards and merges: problem id in the high bits, sample index in the low 20 (ints or arrays)."""
    if np.ndim(problem_id) or np.ndim(sample_index):
        return (np.asarray(problem_id, np.int64) << SAMPLE_BITS) | np.asarray(sample_index, np.int64)
    return (int(problem_id) << SAMPLE_BITS) | int(sample_index)


def count_labels(codes) -> dict:
    """{label name: count} in the format's label order, from stored label codes."""
    counts = np.bincount(np.asarray(codes, np.int64), minlength=len(LABELS))
    return {name: int(counts[code]) for code, name in enumerate(LABELS)}


def timestamp() -> str:
    """The one timestamp format of stores, lock files and probe outputs (local time with its offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_opened(h5file, path, action: str = "read") -> None:
    """Refuse a file that is not a tribunal store, is of a newer schema, or is damaged, in one line each; the
    reader and the writer both open through this."""
    attrs = h5file.attrs
    if as_text(attrs.get("format", "")) != FORMAT_NAME:
        raise StoreError(f"{path} is an HDF5 file but not a tribunal store" +
                         ("; choose another path" if action != "read" else ""))
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise IncompatibleStoreError(f"{path} has store schema {version}, newer than this tribunal can {action} "
                                     f"(schema {SCHEMA_VERSION}); upgrade tribunal")
    damage = schema_problems(h5file)
    if damage:
        raise DamagedStoreError(path, damage)


def layer_name(layer: int) -> str:
    return f"layer_{int(layer):03d}"


def activation_path(layer: int) -> str:
    return f"{ACTIVATIONS}/{layer_name(layer)}"


def default_chunk_tokens(d_model: int, dtype: str) -> int:
    """Token rows per chunk: about TARGET_CHUNK_BYTES, a power of two, within the row bounds."""
    row = d_model * DTYPES[dtype][2]
    rows = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, TARGET_CHUNK_BYTES // max(row, 1)))
    return 1 << (int(rows).bit_length() - 1)


def encode_activations(values: np.ndarray, dtype: str) -> np.ndarray:
    """Turn activations into the words stored on disk.

    bfloat16 arrives either as raw 16-bit words (uint16/int16, e.g. a torch bf16
    tensor viewed as int16) and is kept bit for bit, or as float32, which is
    rounded to nearest-even.
    """
    disk = DTYPES[dtype][0]
    if dtype != "bfloat16":
        return np.asarray(values, dtype=disk)
    values = np.asarray(values)
    if values.dtype in (np.uint16, np.int16):
        return values.view(np.uint16)
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def decode_activations(words: np.ndarray, dtype: str) -> np.ndarray:
    """Real values (float32) from stored words; float16 stays float16 unless asked."""
    if dtype == "bfloat16":
        return (words.astype(np.uint32) << 16).view(np.float32)
    return words


@dataclass(frozen=True)
class StoreIdentity:
    """What must match for two writers (or two shards) to share one store."""

    model_id: str
    layers: tuple
    d_model: int
    dtype: str
    model_revision: str = "unknown"
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def differences(self, other: "StoreIdentity", resume: bool = True) -> list[str]:
        """Human-readable list of what differs, e.g. ["layers: store has [4, 8], asked [4]"].

        resume=False compares only what shards of one run must share (not shard-specific settings).
        """
        out = []
        for name in ("schema_version", "model_id", "model_revision", "layers", "d_model", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "model_id" and self.same_local_model(other):
                continue  # the same content at another path (a copy, another working directory)
            if name == "layers":
                mine, theirs = list(mine), list(theirs)
            if mine != theirs:
                out.append(f"{name}: store has {mine!r}, asked {theirs!r}")
        if resume:
            out += _value_differences("", self.extra, other.extra)
        return out

    def same_local_model(self, other: "StoreIdentity") -> bool:
        """Both stores name a local model by content fingerprint, and the fingerprints agree."""
        return self.model_revision.startswith("local:") and self.model_revision == other.model_revision

    @classmethod
    def from_attrs(cls, attrs) -> "StoreIdentity":
        extra = json.loads(as_text(attrs.get("resume_identity", "{}")))
        return cls(
            model_id=as_text(attrs["model_id"]),
            model_revision=as_text(attrs.get("model_revision", "unknown")),
            layers=tuple(int(x) for x in attrs["layers"]),
            d_model=int(attrs["d_model"]),
            dtype=as_text(attrs["dtype"]),
            schema_version=int(attrs["schema_version"]),
            extra=extra,
        )


def _value_differences(prefix: str, mine, theirs) -> list[str]:
    """'key: store has A, asked B' for each differing leaf; JSON objects (stored as strings) are compared key by
    key, so a refusal names the one setting that differs, not two blobs."""
    mine, theirs = parse_json_text(mine), parse_json_text(theirs)
    if isinstance(mine, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(mine) | set(theirs)):
            out += _value_differences(f"{prefix}{key}.", mine.get(key), theirs.get(key))
        return out
    return [] if mine == theirs else [f"{prefix[:-1]}: store has {mine!r}, asked {theirs!r}"]


def parse_json_text(value):
    """A JSON object or list stored as a string attribute, parsed; anything else as it is."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def as_text(value) -> str:
    """HDF5 string attributes come back as str or bytes depending on how they were written."""
    return value.decode() if isinstance(value, bytes) else str(value)
