"""`tribunal probe trajectory|tokens`: read stores, fit and evaluate, write the numbers into a folder.

Outputs: implicit_value_directions.json and metrics.csv, and a short summary for the terminal. The
results are returned; the report draws them (tribunal/report/), so probes never import the report.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..store import open_store
from ..store.reader import AGGREGATIONS, DEFAULT_BLOCK_BYTES
from . import directions as dirs
from . import verdict
from .verdict import fmt_ci
from .tokens import fit_token_probe
from .trajectory import evaluate_cells, load_trajectory_data

DIRECTIONS_FILE = "implicit_value_directions.json"


def probe_trajectory(stores, out_dir, layers=None, aggregations=AGGREGATIONS, k: int = 10, folds: int = 5,
                     n_boot: int = 1000, permutations: int = 50, seed: int = 0, C: float = 1.0,
                     block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(stores) as store:
        data = load_trajectory_data(store, layers, aggregations, k, block_bytes, progress)
        result = evaluate_cells(data, folds, seed, n_boot, permutations, C, progress)
        result.update(labels=data.y.tolist(), problems=int(len(np.unique(data.groups))))
        settings = {"layers": sorted({c["layer"] for c in result["cells"]}), "aggregations": list(aggregations),
                    "k": k, "folds": folds, "n_boot": n_boot, "permutations": permutations, "seed": seed, "C": C}
        doc = _merge(out, dirs.build_document(store, result, None, settings), "trajectory")
    dirs.save(doc, out / DIRECTIONS_FILE)
    write_metrics_csv(result, out / "metrics.csv")
    return {"document": doc, "result": result, "summary": summarize_trajectory(result)}


def probe_tokens(stores, out_dir, layer: int | None = None, memory_bytes: int = 1 << 30, test_fraction: float = 0.25,
                 seed: int = 0, n_boot: int = 500) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(stores) as store:
        if layer is None:
            layer = store.layers[len(store.layers) // 2]
        token = fit_token_probe(store, layer, memory_bytes, test_fraction, seed, n_boot=n_boot)
        doc = _merge(out, dirs.build_document(store, None, token, {"token_layer": layer}), "token")
    dirs.save(doc, out / DIRECTIONS_FILE)
    return {"document": doc, "token": token, "summary": summarize_tokens(token)}


def _merge(out: Path, doc: dict, part: str) -> dict:
    """Keep the other probe's section when both write into one folder (the same stores only)."""
    path = out / DIRECTIONS_FILE
    if not path.exists():
        return doc
    old = dirs.load(path)
    same = [s["path"] for s in old["provenance"]["stores"]] == [s["path"] for s in doc["provenance"]["stores"]]
    if same:
        for key in ("trajectory", "token"):
            if key != part and key in old:
                doc[key] = old[key]
        doc["settings"] = {**old.get("settings", {}), **doc["settings"]}
    return doc


def write_metrics_csv(result: dict, path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "aggregation", "scorer", "metric", "value", "ci_low", "ci_high", "probe_beats", "permutation_p"])
        for c in result["cells"]:
            for scorer, block in [("probe", c["metrics"])] + list(c["baselines"].items()):
                for metric, v in block.items():
                    beats = "" if scorer == "probe" else c["beats"].get(scorer, "")
                    w.writerow([c["layer"], c["aggregation"], scorer, metric, f"{v['value']:.4f}", f"{v['ci'][0]:.4f}",
                                f"{v['ci'][1]:.4f}", beats, f"{c['permutation_p']:.4f}" if scorer == "probe" else ""])


def summarize_trajectory(result: dict) -> str:
    """The terminal summary: the headline first (a null reads as a null), then the selection and the cells."""
    sel = result["selection"]
    final = sel["final"]
    cell = next(c for c in result["cells"] if c["layer"] == final["layer"] and c["aggregation"] == final["aggregation"])
    y = np.asarray(result["labels"])
    lines = [
        verdict.headline(sel),
        f"traces: {len(y)} graded ({int(y.sum())} correct, {int(len(y) - y.sum())} incorrect) from "
        f"{result['problems']} problems; {result['folds']}-fold CV grouped by problem",
        f"selection: {sel['method']}",
        *verdict.selection_sentences(sel),
        f"nested-CV balanced accuracy {fmt_ci(sel['nested_metrics']['balanced_accuracy'])}",
        *verdict.calibration_sentences(sel),
        f"layer {final['layer']}, {final['aggregation']} (grouped CV over all problems, optimistic after the search): "
        f"AUROC {fmt_ci(cell['metrics']['auroc'])}; " + "; ".join(verdict.claims(cell)),
        "baselines on the same folds: " + ", ".join(
            f"{n} {b['auroc']['value']:.3f}" for n, b in cell["baselines"].items()),
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def summarize_tokens(token: dict) -> str:
    lines = [f"token probe, layer {token['layer']}: {token['train_tokens']} training tokens from "
             f"{token['train_problems']} problems, {token['test_tokens']} held-out tokens from {token['test_problems']} problems"]
    for name, d in token["directions"].items():
        by = [b["value"] for b in d["auroc_by_position"]]
        lines.append(f"{name}: held-out token AUROC {fmt_ci(d['auroc'])}; by position (first -> last tenth): "
                     + " ".join(f"{v:.2f}" for v in by))
    return "\n".join(lines)

