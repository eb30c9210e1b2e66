"""`tribunal run`: the main job in one command: generate, both probes, one-page report, in one run folder.

The only module that chains the generator and the probes (which never import each other).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..probes.run import DIRECTIONS_FILE, probe_tokens, probe_trajectory
from ..traces.generate import GenerateConfig, format_summary, run_generation

STORE_NAME = "store.h5"


def run_pipeline(run_dir, generate_options: dict, probe_options: dict | None = None, progress: bool = True) -> dict:
    """Generate into RUN/store.h5 (resuming), probe it, write RUN/report.md. Returns what each step said."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    probe_options = probe_options or {}
    started = time.time()
    gen = run_generation(GenerateConfig(out=str(run / STORE_NAME), progress=progress, **generate_options))
    result = {"generate": gen, "run_dir": str(run)}
    if gen["status"] != "done":
        return result
    store = run / STORE_NAME
    traj = probe_trajectory(store, run, k=probe_options.get("k", 10), folds=probe_options.get("folds", 5),
                            n_boot=probe_options.get("n_boot", 1000), permutations=probe_options.get("permutations", 50),
                            seed=probe_options.get("seed", 0), progress=progress)
    tok = probe_tokens(store, run, layer=traj["result"]["selection"]["chosen"]["layer"],
                       memory_bytes=probe_options.get("memory_bytes", 1 << 30), seed=probe_options.get("seed", 0))
    result.update(trajectory=traj["summary"], tokens=tok["summary"])
    write_report(run / "report.md", gen, traj, tok, time.time() - started)
    return result


def write_report(path, gen: dict, traj: dict, tok: dict, seconds: float) -> None:
    doc = traj["document"]
    prov = doc["provenance"]
    sel = traj["result"]["selection"]
    chosen = sel["chosen"]
    nested = sel["nested_metrics"]
    lines = [
        "# tribunal run report",
        "",
        f"Model `{prov['model']}` ({prov['model_revision']}), layers {prov['layers']}, d_model {prov['d_model']}, "
        f"stored as {prov['dtype']}; dataset `{prov['dataset']['id']}` [{prov['dataset']['split']}]; "
        f"tribunal {prov['tribunal_version']}; {seconds:.0f} s in all.",
        "",
        "## Traces",
        "",
        f"{format_summary(gen)}.",
        "",
        f"Labels in the store: {prov['labels']} from {prov['problems']} problems.",
        "",
        "## Does the residual stream know whether the trace is right?",
        "",
        f"**Headline (nested, problem-grouped CV):** ROC-AUC {_fmt(nested['auroc'])}, balanced accuracy "
        f"{_fmt(nested['balanced_accuracy'])}, for the cell chosen without seeing its test folds: layer "
        f"{chosen['layer']}, `{chosen['aggregation']}` ({sel['method']}).",
        "",
        "```",
        traj["summary"],
        "```",
        "",
        "![probe results](probe_results.png)",
        "",
        "Each panel: the probe's ROC-AUC by layer with 95% CIs (bootstrap over problems), beside the baselines on the "
        "same folds. Right: held-out logits of the chosen cell.",
        "",
        f"Calibration of the chosen cell (nested predictions): Brier {sel['calibration']['brier']:.3f}, "
        f"ECE {sel['calibration']['ece']:.3f}.",
        "",
        "| bin | mean predicted | fraction correct | traces |",
        "|---|---|---|---|",
    ]
    for b in sel["calibration"]["reliability_curve"]:
        lines.append(f"| {b['bin'][0]:.1f}-{b['bin'][1]:.1f} | {b['mean_predicted']:.2f} | {b['fraction_correct']:.2f} | {b['count']} |")
    lines += [
        "",
        "## When does the signal appear? (per-token probe)",
        "",
        "```",
        tok["summary"],
        "```",
        "",
        "![token probe](token_probe.png)",
        "",
        "## Files",
        "",
        "- `store.h5`: the activation store (`tribunal inspect store.h5`)",
        f"- `{DIRECTIONS_FILE}`: directions, metrics with CIs, baselines and provenance (`tribunal score`)",
        "- `metrics.csv`: every cell and baseline, one metric per row",
        "",
    ]
    Path(path).write_text("\n".join(lines))


def _fmt(m) -> str:
    return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"
