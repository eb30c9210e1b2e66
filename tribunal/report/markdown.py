"""report.md: one page a reader cannot misread. The headline comes first and a null reads as a null."""

from __future__ import annotations

from pathlib import Path

from ..probes import verdict
from ..probes.run import DIRECTIONS_FILE
from ..probes.verdict import fmt_ci
from .outputs import TOKEN_FIGURE, TRAJECTORY_FIGURE


def write_report(path, generation_summary: str, traj: dict, tok: dict, seconds: float) -> None:
    doc = traj["document"]
    prov = doc["provenance"]
    result = traj["result"]
    sel = result["selection"]
    final = sel["final"]
    cell = next(c for c in result["cells"] if c["layer"] == final["layer"] and c["aggregation"] == final["aggregation"])
    lines = [
        "# tribunal run report",
        "",
        f"**{verdict.headline(sel)}**",
        "",
        " ".join(verdict.selection_sentences(sel)),
        "",
        f"Model `{prov['model']}` ({prov['model_revision']}), layers {prov['layers']}, d_model {prov['d_model']}, "
        f"stored as {prov['dtype']}; dataset `{prov['dataset']['id']}` [{prov['dataset']['split']}]; "
        f"tribunal {prov['tribunal_version']}; {seconds:.0f} s in all.",
        "",
        "## Traces",
        "",
        f"{generation_summary}.",
        "",
        f"Labels in the store: {prov['labels']} from {prov['problems']} problems.",
        "",
        "## Does the residual stream know whether the trace is right?",
        "",
        f"The selection procedure ({sel['method']}) scores ROC-AUC {fmt_ci(sel['nested_metrics']['auroc'])} and "
        f"balanced accuracy {fmt_ci(sel['nested_metrics']['balanced_accuracy'])} on problems it never saw. "
        f"The family-wise permutation p ({sel['family_wise']['method']}) is {sel['family_wise']['p']:.3f}; it is the "
        "p the headline uses. Per-cell p-values below are uncorrected for the search.",
        "",
        f"Layer {final['layer']}, `{final['aggregation']}` over all problems (grouped CV; optimistic, as it won the "
        f"search): ROC-AUC {fmt_ci(cell['metrics']['auroc'])}; " + "; ".join(verdict.claims(cell)) + ".",
        "",
        "```",
        traj["summary"],
        "```",
        "",
        f"![probe results]({TRAJECTORY_FIGURE})",
        "",
        "Left panels: each cell's ROC-AUC by layer (grouped CV, 95% CIs from resampling problems) beside its "
        "baselines on the same folds, each with its own CI; the dotted line is chance (0.5). Then: held-out logits "
        "of the selection procedure (nested CV, whatever cell each fold chose) for correct and incorrect traces; "
        "and the reliability diagram of those predictions before and after Platt scaling.",
        "",
        "## Calibration",
        "",
        *[f"- {s}" for s in verdict.calibration_sentences(sel)],
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
        f"![token probe]({TOKEN_FIGURE})",
        "",
        "Left: held-out token ROC-AUC by relative position in the generated trace (bands: 95% CIs from resampling "
        "problems). Right: the mean projection of correct and incorrect traces' tokens on each direction, by "
        "position (bands: 95% CI of the mean over held-out traces, mean +- 1.96 standard errors).",
        "",
        "## Files",
        "",
        "- `store.h5`: the activation store (`tribunal inspect store.h5`)",
        f"- `{DIRECTIONS_FILE}`: directions, metrics with CIs, baselines and provenance (`tribunal score`)",
        "- `metrics.csv`: every cell and baseline, one metric per row",
        "",
    ]
    Path(path).write_text("\n".join(lines))
