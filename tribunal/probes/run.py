"""`tribunal probe trajectory|tokens`: read stores, fit and evaluate, write the outputs into a folder.

Outputs: implicit_value_directions.json, metrics.csv, probe_results.png (trajectory) and
token_probe.png (tokens), and a short summary for the terminal.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..store import open_store
from ..store.reader import AGGREGATIONS, DEFAULT_BLOCK_BYTES
from . import directions as dirs
from .tokens import fit_token_probe
from .trajectory import evaluate_cells, load_trajectory_data

DIRECTIONS_FILE = "implicit_value_directions.json"


def probe_trajectory(stores, out_dir, layers=None, aggregations=AGGREGATIONS, k: int = 10, folds: int = 5,
                     n_boot: int = 1000, permutations: int = 50, seed: int = 0, C: float = 1.0,
                     block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = True) -> dict:
    from ..report.plots import probe_results

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(stores) as store:
        data = load_trajectory_data(store, layers, aggregations, k, block_bytes, progress)
        result = evaluate_cells(data, folds, seed, n_boot, permutations, C, progress)
        settings = {"layers": sorted({c["layer"] for c in result["cells"]}), "aggregations": list(aggregations),
                    "k": k, "folds": folds, "n_boot": n_boot, "permutations": permutations, "seed": seed, "C": C}
        doc = _merge(out, dirs.build_document(store, result, None, settings), "trajectory")
    dirs.save(doc, out / DIRECTIONS_FILE)
    write_metrics_csv(result, out / "metrics.csv")
    probe_results(result, data.y, out / "probe_results.png")
    return {"document": doc, "result": result, "summary": summarize_trajectory(result, data)}


def probe_tokens(stores, out_dir, layer: int | None = None, memory_bytes: int = 1 << 30, test_fraction: float = 0.25,
                 seed: int = 0, n_boot: int = 500) -> dict:
    from ..report.plots import token_probe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(stores) as store:
        if layer is None:
            layer = store.layers[len(store.layers) // 2]
        token = fit_token_probe(store, layer, memory_bytes, test_fraction, seed, n_boot=n_boot)
        doc = _merge(out, dirs.build_document(store, None, token, {"token_layer": layer}), "token")
    dirs.save(doc, out / DIRECTIONS_FILE)
    token_probe(token, out / "token_probe.png")
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


def _fmt(m) -> str:
    return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def claims(cell: dict) -> list[str]:
    """What a reader may and may not claim about one cell, in words."""
    out = []
    lost = [n for n, ok in cell["beats"].items() if not ok and n != "permutation"]
    if not cell["beats"].get("permutation", False):
        out.append(f"not significant against the grouped permutation null (p = {cell['permutation_p']:.3f})")
    if "length" in lost:
        out.append("does NOT beat the trace-length baseline (paired AUROC difference CI includes 0): "
                   "trace length alone does about as well")
    if "confidence" in lost:
        out.append("does NOT beat the output-confidence baseline (mean log-prob / entropy)")
    for other in ("majority", "random_direction"):
        if other in lost:
            out.append(f"does not beat the {other.replace('_', ' ')} baseline")
    if not out:
        out.append("beats every baseline (paired bootstrap over problems) and the permutation null")
    return out


def summarize_trajectory(result: dict, data) -> str:
    sel = result["selection"]
    chosen = sel["chosen"]
    cell = next(c for c in result["cells"] if c["layer"] == chosen["layer"] and c["aggregation"] == chosen["aggregation"])
    best = max(result["cells"], key=lambda c: c["metrics"]["auroc"]["value"])
    n_problems = len(np.unique(data.groups))
    lines = [
        f"traces: {len(data.y)} graded ({int(data.y.sum())} correct, {int(len(data.y) - data.y.sum())} incorrect) "
        f"from {n_problems} problems; {result['folds']}-fold CV grouped by problem",
        f"selection: {sel['method']}",
        f"chosen cell: layer {chosen['layer']}, {chosen['aggregation']} (per fold: {sel['chosen_per_fold']})",
        f"nested-CV AUROC {_fmt(sel['nested_metrics']['auroc'])}, balanced accuracy "
        f"{_fmt(sel['nested_metrics']['balanced_accuracy'])}; Brier {sel['calibration']['brier']:.3f}, "
        f"ECE {sel['calibration']['ece']:.3f}",
        f"chosen cell (grouped CV): AUROC {_fmt(cell['metrics']['auroc'])}; " + "; ".join(claims(cell)),
        "baselines on the same folds: " + ", ".join(
            f"{n} {b['auroc']['value']:.3f}" for n, b in cell["baselines"].items()),
        f"best single cell: layer {best['layer']}, {best['aggregation']}: AUROC {_fmt(best['metrics']['auroc'])} "
        "(picked after seeing all cells: optimistic, use the nested figure)",
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def summarize_tokens(token: dict) -> str:
    lines = [f"token probe, layer {token['layer']}: {token['train_tokens']} training tokens from "
             f"{token['train_problems']} problems, {token['test_tokens']} held-out tokens from {token['test_problems']} problems"]
    for name, d in token["directions"].items():
        by = [b["value"] for b in d["auroc_by_position"]]
        lines.append(f"{name}: held-out token AUROC {_fmt(d['auroc'])}; by position (first -> last tenth): "
                     + " ".join(f"{v:.2f}" for v in by))
    return "\n".join(lines)

