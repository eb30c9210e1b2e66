"""report.md: one page a reader cannot misread. The headline comes first and a null reads as a null."""

from __future__ import annotations

from pathlib import Path

from ..probes import verdict
from ..probes.run import DIRECTIONS_FILE
from ..probes.verdict import fmt_ci
from .outputs import CHUNK_FIGURE, EXIT_FIGURE, TOKEN_FIGURE, TRAJECTORY_FIGURE


def write_report(path, generation_summary: str, traj: dict, tok: dict, seconds: float,
                 chunks: dict | None = None) -> None:
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
        f"tribunal {prov['tribunal_version']}; {seconds:.0f} s in all. Sampled by "
        + "; ".join(sorted({s["sampled_by"] for s in prov["stores"]})) + ".",
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
    ]
    if chunks is not None:
        lines += chunk_section(chunks)
    lines += [
        "",
        "## Files",
        "",
        "- `store.h5`: the activation store (`tribunal inspect store.h5`)",
        f"- `{DIRECTIONS_FILE}`: directions, metrics with CIs, baselines and provenance (`tribunal score`)",
        "- `metrics.csv`: every cell and baseline, one metric per row",
        "- `chunks.csv`, `chunk_metrics.json`: every chunk with its answer, label and held-out probability; the "
        "chunk probe's headline and early exit",
        "",
    ]
    Path(path).write_text("\n".join(lines))


def chunk_section(chunks: dict) -> list[str]:
    """Does the model know mid-thought, and the early exit that would follow from it."""
    result, m = chunks["result"], chunks["metrics"]
    exit_ = result["early_exit"]
    probe = exit_["rules"]["probe"]
    return [
        "",
        "## Does the model know mid-thought? Chunk probes and early exit",
        "",
        "```",
        chunks["summary"],
        "```",
        "",
        f"![chunk probe]({CHUNK_FIGURE})",
        "",
        "### Early exit",
        "",
        f"Stopping each trace at its first chunk whose held-out probe probability reaches a threshold chosen on the "
        f"training folds only (the largest token saving with training accuracy no worse than the full traces' minus "
        f"{exit_['margin']:.2f}): accuracy {probe['accuracy']:.3f} [{probe['accuracy_ci'][0]:.3f}, "
        f"{probe['accuracy_ci'][1]:.3f}] against {exit_['full']['accuracy']:.3f} for the full traces, "
        f"{m['early_exit']['tokens_saved']:.1%} of generated tokens saved [{probe['tokens_saved_ci'][0]:.1%}, "
        f"{probe['tokens_saved_ci'][1]:.1%}] (95% CIs over problems). The same procedure driven by output confidence, "
        "stopping at the first intermediate answer, and stopping at a fixed fraction of tokens ran on the same traces: "
        f"{exit_['verdict']}.",
        "",
        f"![early exit]({EXIT_FIGURE})",
    ]
