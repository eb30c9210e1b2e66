"""`tribunal probe trajectory|tokens|chunks`: read stores, fit and evaluate, write the numbers into a folder.

Outputs: implicit_value_directions.json, metrics.csv (trajectory), chunks.csv, chunk_metrics.json and
exit_calibration.csv (chunks),
and a short summary for the terminal. The results are returned; the report draws them (tribunal/report/), so
probes never import the report. Options are ProbeConfig's fields (probes/config.py). Every input is checked and
every number computed before the output folder is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..chunks import DEFAULT_CUES
from ..errors import TribunalError
from ..store import open_store
from . import directions as dirs
from . import exit_policy, verdict
from .config import ProbeConfig
from .verdict import fmt_ci
from .tokens import fit_token_probe
from .trajectory import evaluate_cells, load_trajectory_data

DIRECTIONS_FILE = exit_policy.DIRECTIONS_FILE


def probe_trajectory(stores, out_dir, layers=None, progress: bool = True, **options) -> dict:
    """Every stored layer (or `layers`) x aggregation: probes beside baselines on grouped folds, nested selection."""
    cfg = ProbeConfig(**options).validate()
    with open_store(stores) as store:
        cfg.check_store(store)
        data = load_trajectory_data(store, layers, cfg.aggregations, cfg.last_k, cfg.block_bytes, progress)
        result = evaluate_cells(data, cfg.folds, cfg.seed, cfg.permutations, cfg.C, progress)
        result.update(labels=data.y.tolist(), problems=int(len(np.unique(data.groups))))
        settings = {"layers": sorted({c["layer"] for c in result["cells"]}),
                    **{f.name: getattr(cfg, f.name) for f in cfg.cli_fields("trajectory")}}
        out = _output_folder(out_dir)
        doc = _merge(out, dirs.build_document(store, result, None, settings), "trajectory")
    dirs.save(doc, out / DIRECTIONS_FILE)
    write_metrics_csv(result, out / "metrics.csv")
    return {"document": doc, "result": result, "summary": summarize_trajectory(result)}


def probe_tokens(stores, out_dir, layer: int | None = None, progress: bool = True, **options) -> dict:
    """The per-token probe at `layer` (default: the middle stored layer), fit out of core within --memory."""
    cfg = ProbeConfig(**options).validate()
    with open_store(stores) as store:
        cfg.check_store(store)
        if layer is None:
            layer = store.layers[len(store.layers) // 2]
        token = fit_token_probe(store, layer, cfg.memory_bytes, cfg.test_fraction, cfg.seed, progress=progress)
        settings = {"token_layer": layer, **{f"token_{f.name}": getattr(cfg, f.name) for f in cfg.cli_fields("tokens")}}
        out = _output_folder(out_dir)
        doc = _merge(out, dirs.build_document(store, None, token, settings), "token")
    dirs.save(doc, out / DIRECTIONS_FILE)
    return {"document": doc, "token": token, "summary": summarize_tokens(token)}


def probe_chunks(stores, out_dir, decode_pieces, pattern=None, progress: bool = True, trial_answer=None,
                 trial_answer_correct=None, chunking: dict | None = None, **options) -> dict:
    """Chunk probes and early exit: chunks.csv, chunk_metrics.json, exit_calibration.csv and the `chunk` section of
    the directions file (with the `auto` exit thresholds).

    trial_answer (DEER's score) and trial_answer_correct (whether that trial answer is right): optional per-chunk
    arrays aligned with load_chunks' rows; the first adds the "trial_answer" exit rule, both add columns.
    chunking: the cues and extra regex `pattern` was built from, recorded so the live monitor chunks alike."""
    from .chunk_probe import evaluate_chunk_probe, load_chunks

    cfg = ProbeConfig(**options).validate()
    with open_store(stores) as store:
        cfg.check_store(store)
        data = load_chunks(store, decode_pieces, pattern, progress)
        extra = {name: np.asarray(v, float) for name, v in (("trial_answer", trial_answer),
                                                           ("trial_answer_correct", trial_answer_correct))
                 if v is not None}
        for name, v in extra.items():
            if v.shape != data.y.shape:
                raise TribunalError(f"{name} has {v.size} values but the store has {len(data.y)} answering chunks: "
                                    "compute it on the same store and chunking")
        result = evaluate_chunk_probe(store, data, cfg.folds, cfg.seed, cfg.permutations, cfg.C, cfg.margin,
                                      cfg.block_bytes, progress, extra.get("trial_answer"))
        settings = {f"chunk_{f.name}": getattr(cfg, f.name) for f in cfg.cli_fields("chunks")}
        out = _output_folder(out_dir)
        doc = _merge(out, dirs.build_document(store, None, None, settings), "chunk")
    final = result["selection"]["final"]
    layer = next(c for c in result["layers"] if c["layer"] == final["layer"])
    doc["chunk"] = {"probe": "StandardScaler + L2 LogisticRegression on the residual at each chunk's last token",
                    "selection": result["selection"],
                    "direction": {k: layer[k] for k in ("layer", "direction", "weight_norm", "bias", "scaler_mean",
                                                        "scaler_scale")},
                    "layers": result["layers"], "baselines": result["baselines"],
                    "early_exit": {k: v for k, v in result["early_exit"].items() if k != "curves"},
                    "exit_thresholds": result["early_exit"]["exit_thresholds"],
                    "exit_thresholds_how": result["early_exit"]["exit_thresholds_how"],
                    "chunking": chunking or {"cues": list(DEFAULT_CUES), "extra": None}}
    dirs.save(doc, out / DIRECTIONS_FILE)
    write_chunks_csv(data, result, out / "chunks.csv", extra.get("trial_answer"))
    exit_policy.write_calibration(out / exit_policy.CALIBRATION_FILE, data,
                                  {"probe": result["oof_probability"], "confidence": data.confidence, **extra})
    headline = _chunk_headline(result)
    (out / "chunk_metrics.json").write_text(json.dumps(headline, indent=1))
    return {"document": doc, "result": result, "data": data, "metrics": headline,
            "summary": summarize_chunks(result)}


def _output_folder(out_dir) -> Path:
    """The output folder, created only now that the numbers are in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _chunk_headline(result: dict) -> dict:
    """chunk_metrics.json: each figure under the name of what it measures. `nested` scores the selection
    procedure (each outer fold chose its own layer); `direction_cell` is the layer refit on all problems that the
    directions file and `tribunal score --chunks` use (its per-cell figure is optimistic: it won the search)."""
    sel, exit_ = result["selection"], result["early_exit"]
    probe, final = exit_["rules"]["probe"], sel["final"]
    cell = next(c for c in result["layers"] if c["layer"] == final["layer"])
    return {"nested": {"auroc": sel["nested_metrics"]["auroc"]["value"], "auroc_ci": sel["nested_metrics"]["auroc"]["ci"],
                       "family_wise_p": sel["family_wise"]["p"], "brier": sel["calibration"]["brier"],
                       "ece": sel["calibration"]["ece"], "folds_chose": sel["chosen_per_fold"]},
            "direction_cell": {"layer": final["layer"], "auroc": cell["metrics"]["auroc"]["value"],
                               "auroc_ci": cell["metrics"]["auroc"]["ci"], "folds_chose_it": final["folds_won"],
                               "note": "per-cell grouped CV over all problems; optimistic, it won the search"},
            "chunks": result["chunks"], "traces": result["traces"], "problems": result["problems"],
            "early_exit": {"accuracy": probe["accuracy"], "accuracy_ci": probe["accuracy_ci"],
                           "full_accuracy": probe["full_accuracy"], "tokens_saved": probe["tokens_saved"],
                           "tokens_saved_ci": probe["tokens_saved_ci"], "margin": exit_["margin"],
                           "thresholds_per_fold": probe["chosen_per_fold"], "verdict": exit_["verdict"],
                           "baselines": {n: {"accuracy": r["accuracy"], "tokens_saved": r["tokens_saved"]}
                                         for n, r in exit_["rules"].items() if n != "probe"}}}


def write_chunks_csv(data, result: dict, path, trial_answer=None) -> None:
    prob = result["oof_probability"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trace", "problem_id", "chunk", "token_start", "token_end", "answer", "label", "oof_probability"]
                   + (["trial_answer"] if trial_answer is not None else []))
        for j in range(len(data.y)):
            w.writerow([int(data.trace[j]), int(data.problem[j]), int(data.index[j]), int(data.token_start[j]),
                        int(data.token_end[j]), data.answer[j], "correct" if data.y[j] else "incorrect",
                        f"{prob[j]:.4f}"] + ([f"{trial_answer[j]:.4f}"] if trial_answer is not None else []))


def summarize_chunks(result: dict) -> str:
    sel, exit_ = result["selection"], result["early_exit"]
    probe, full = exit_["rules"]["probe"], exit_["full"]
    lines = [
        verdict.headline(sel).replace("whether a trace is correct", "whether an intermediate answer is correct"),
        f"chunks: {result['chunks']} intermediate answers ({result['positive_rate']:.0%} correct) in {result['traces']} "
        f"traces of {result['problems']} problems; {result['folds']}-fold CV grouped by problem",
        *verdict.selection_sentences(sel),
        "baselines on the same folds (AUROC): " + ", ".join(
            f"{n} {b['auroc']['value']:.3f}" for n, b in result["baselines"].items()),
        "; ".join(f"does NOT beat the {n.replace('_', ' ')} baseline" for n, ok in result["beats"].items() if not ok)
        or "beats every baseline (paired CI of the CV ROC-AUC difference above 0)",
        f"early exit (threshold chosen on training folds, accuracy margin {exit_['margin']:.2f}): accuracy "
        f"{probe['accuracy']:.3f} {_ci(probe['accuracy_ci'])} vs {full['accuracy']:.3f} for the full traces, tokens saved "
        f"{probe['tokens_saved']:.1%} {_ci(probe['tokens_saved_ci'], pct=True)}",
        "other exit rules: " + "; ".join(
            f"{n.replace('_', ' ')}: accuracy {r['accuracy']:.3f}, tokens saved {r['tokens_saved']:.1%}"
            for n, r in exit_["rules"].items() if n != "probe"),
        "auto exit thresholds (chosen on all traces' out-of-fold scores, same margin): " + ", ".join(
            f"{n.replace('_', ' ')} {'never exit' if t is None else f'{t:g}'}" for n, t in exit_["exit_thresholds"].items()),
        exit_["verdict"],
    ]
    return "\n".join(lines)


def _ci(ci, pct: bool = False) -> str:
    return f"[{ci[0]:.1%}, {ci[1]:.1%}]" if pct else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _merge(out: Path, doc: dict, part: str) -> dict:
    """Keep the other probe's section when both write into one folder (the same stores only)."""
    path = out / DIRECTIONS_FILE
    if not path.exists():
        return doc
    old = dirs.load(path)
    same = [s["path"] for s in old["provenance"]["stores"]] == [s["path"] for s in doc["provenance"]["stores"]]
    if same:
        for key in ("trajectory", "token", "chunk"):
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

