"""implicit_value_directions.json: the probes' directions with their evidence and provenance; and scoring with them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import TribunalError
from ..store.format import timestamp
from ..store.reader import Store, overlapping_traces
from ..store.summary import sampled_by

FORMAT = "tribunal-implicit-value-directions"
VERSION = 1


def provenance(store: Store) -> dict:
    return {
        "stores": [{"path": str(s.path), "size_bytes": s.size_bytes(), "traces": s.n_traces,
                    "sampled_by": sampled_by(s.attrs.get("generation_settings"))} for s in store.shards],
        "model": store.model_id, "model_revision": store.attrs.get("model_revision"), "layers": list(store.layers),
        "d_model": store.d_model, "dtype": store.dtype, "schema_version": int(store.attrs["schema_version"]),
        "tribunal_version": __version__, "created": timestamp(),
        "traces": store.n_traces, "labels": store.label_counts(),
        "problems": int(len(np.unique(store.table["problem_id"]))) if store.n_traces else 0,
        "dataset": {"id": store.attrs.get("dataset_id"), "split": store.attrs.get("dataset_split")},
    }


def build_document(store: Store, trajectory: dict | None, token: dict | None, settings: dict) -> dict:
    doc = {"format": FORMAT, "version": VERSION, "provenance": provenance(store), "settings": settings}
    if trajectory is not None:
        cells = []
        for c in trajectory["cells"]:
            cells.append({k: v for k, v in c.items() if k != "oof_probability"})
        doc["trajectory"] = {
            "probe": "StandardScaler + L2 LogisticRegression (scikit-learn); logit = weight_norm * (direction . x) + bias, "
                     "x = the aggregate of the trace's activations at that layer",
            "evaluation": f"{trajectory['folds']}-fold cross-validation grouped by problem (stratified where possible); "
                          f"{trajectory['intervals']}",
            "selection": _without_oof(trajectory["selection"]),
            "notes": trajectory["notes"], "cells": cells,
        }
    if token is not None:
        doc["token"] = token
    return doc


def _without_oof(selection: dict) -> dict:
    """The selection without its per-trace out-of-fold probabilities (large, and in metrics of their own)."""
    out = {k: v for k, v in selection.items() if k != "oof_probability"}
    out["calibrated"] = {k: v for k, v in selection["calibrated"].items() if k != "oof_probability"}
    return out


def save(doc: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(doc, indent=1, default=_jsonable))
    return path


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value))


def load(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "implicit_value_directions.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise TribunalError(f"{path} does not exist; run `tribunal probe trajectory` first") from None
    except json.JSONDecodeError as exc:
        raise TribunalError(f"{path} is not valid JSON ({exc})") from None
    if doc.get("format") != FORMAT:
        raise TribunalError(f"{path} is not an implicit_value_directions.json written by tribunal")
    if doc.get("version", 0) > VERSION:
        raise TribunalError(f"{path} has version {doc['version']}, newer than this tribunal reads; upgrade tribunal")
    return doc


def pick_cell(doc: dict, layer: int | None = None, aggregation: str | None = None) -> dict:
    """A trajectory cell: by default the one the selection refit on all problems chose (selection.final)."""
    traj = doc.get("trajectory")
    if not traj:
        raise TribunalError("the directions file has no trajectory probes")
    chosen = traj["selection"].get("final") or traj["selection"]["chosen"]  # "chosen": files written before "final"
    layer = chosen["layer"] if layer is None else int(layer)
    aggregation = chosen["aggregation"] if aggregation is None else aggregation
    for cell in traj["cells"]:
        if cell["layer"] == layer and cell["aggregation"] == aggregation:
            return cell
    have = sorted({(c["layer"], c["aggregation"]) for c in traj["cells"]})
    raise TribunalError(f"no direction for layer {layer}, aggregation {aggregation}; the file has {have}")


def score_store(doc: dict, store: Store, out_csv, layer: int | None = None, aggregation: str | None = None,
                block_bytes: int = 64 << 20) -> dict:
    """Per-token probe logits of every stored trace (the study's Phase-2 monitor), written to a CSV.

    Each row: trace, token position, whether generated, the logit weight_norm * (u . x_t) + bias. Because
    the probe is linear, the mean of a trace's generated-token logits equals the trajectory probe's logit
    on its mean aggregate.
    """
    prov = doc["provenance"]
    if prov["d_model"] != store.d_model:
        raise TribunalError(f"the directions have d_model {prov['d_model']}, the store {store.d_model}: "
                            "they come from another model")
    cell = pick_cell(doc, layer, aggregation)
    if cell["layer"] not in store.layers:
        raise TribunalError(f"the direction is for layer {cell['layer']}, which the store lacks (it has {list(store.layers)})")
    u = np.asarray(cell["direction"], np.float64)
    norm, bias = float(cell["weight_norm"]), float(cell["bias"])
    table = store.table
    starts = table["token_start"].astype(np.int64)
    ends = table["token_end"].astype(np.int64)
    plen = table["prompt_length"].astype(np.int64)
    per_trace = np.zeros(store.n_traces)
    counts = np.zeros(store.n_traces)
    labels = store.labels
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trace", "trace_id", "problem_id", "sample_index", "label", "position", "is_generated",
                         "relative_position", "logit"])
        for s, first, block in store.iter_blocks(cell["layer"], block_bytes):
            logits = norm * (block.astype(np.float64) @ u) + bias
            trace, local, gen = block_positions(store, s, first, len(block))
            n_gen = np.maximum(ends[trace] - starts[trace] - plen[trace], 1)
            rel = np.where(gen, (local - plen[trace]) / n_gen, np.nan)
            np.add.at(per_trace, trace[gen], logits[gen])
            np.add.at(counts, trace[gen], 1)
            writer.writerows(zip(trace.tolist(), table["trace_id"][trace].tolist(), table["problem_id"][trace].tolist(),
                                 table["sample_index"][trace].tolist(), labels[trace].tolist(), local.tolist(),
                                 gen.astype(int).tolist(), [f"{x:.4f}" if x == x else "" for x in rel.tolist()],
                                 [f"{x:.6g}" for x in logits.tolist()]))
    return {"layer": cell["layer"], "aggregation": cell["aggregation"], "csv": str(out_csv),
            "mean_generated_logit": (per_trace / np.maximum(counts, 1)).tolist()}


def block_positions(store: Store, shard: int, first: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the `rows` token rows of shard `shard` from row `first` (a block of Store.iter_blocks): each row's global
    trace, its position in that trace, and whether it is a generated token."""
    table = store.table
    starts, ends = table["token_start"].astype(np.int64), table["token_end"].astype(np.int64)
    at = np.arange(first, first + rows)
    overlap = overlapping_traces(starts, ends, store.trace_offsets, shard, first, first + rows)
    trace = overlap[np.searchsorted(starts[overlap], at, side="right") - 1]
    local = at - starts[trace]
    return trace, local, local >= table["prompt_length"].astype(np.int64)[trace]


def projection_sd(store: Store, layer: int, direction, block_bytes: int = 64 << 20) -> float:
    """The standard deviation of `direction . x` over every generated token of the store at `layer`: the unit in
    which `tribunal steer` moves the residual (alpha = 1 is one standard deviation of the model's own spread)."""
    u = np.asarray(direction, np.float64)
    total = square = count = 0.0
    for s, first, block in store.iter_blocks(layer, block_bytes):
        _, _, gen = block_positions(store, s, first, len(block))
        x = block[gen].astype(np.float64) @ u
        total, square, count = total + x.sum(), square + (x * x).sum(), count + len(x)
    if count < 2:
        raise TribunalError("the probing store has fewer than two generated tokens: it cannot scale a steering shift")
    mean = total / count
    return float(np.sqrt(max(square / count - mean * mean, 0.0)))
