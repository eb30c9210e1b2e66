"""Figures people would rather look at than read: probe metrics by layer, separation, calibration, token signal."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BASELINE_STYLE = {"length": ("tab:orange", "s"), "confidence": ("tab:green", "^"),
                  "random_direction": ("tab:gray", "v"), "majority": ("black", "x")}


def _chance(ax, label: bool) -> None:
    ax.axhline(0.5, color="gray", lw=0.8, ls=":", label="chance (0.5)" if label else None)


def probe_results(trajectory: dict, path) -> None:
    """Per aggregation: AUROC by layer with 95% CIs, baselines as markers with their own CIs; then the held-out
    logits of the selection procedure, and its reliability diagram before and after Platt scaling."""
    cells = trajectory["cells"]
    aggs = sorted({c["aggregation"] for c in cells})
    n = len(aggs) + 2
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6), squeeze=False)
    for i, (ax, agg) in enumerate(zip(axes[0], aggs)):
        row = sorted((c for c in cells if c["aggregation"] == agg), key=lambda c: c["layer"])
        layers = np.array([c["layer"] for c in row], float)
        _errorbars(ax, layers, [c["metrics"]["auroc"] for c in row], "tab:blue", "o", "probe", 0.0, line=True)
        names = [name for name in BASELINE_STYLE if name in row[0]["baselines"]]
        for j, name in enumerate(names):
            color, marker = BASELINE_STYLE[name]
            offset = 0.12 * (j + 1) if len(layers) == 1 else 0.1 * (j + 1)
            _errorbars(ax, layers, [c["baselines"][name]["auroc"] for c in row], color, marker,
                       name.replace("_", " "), offset)
        _chance(ax, label=i == 0)
        ax.set_ylim(0.2, 1.02)
        ax.set_title(agg + (f" (k={row[0]['k']})" if row[0].get("k") else ""), fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        if len(layers) == 1:
            ax.set_xlim(layers[0] - 0.5, layers[0] + 0.8)
    axes[0][0].set_ylabel("ROC-AUC (grouped CV, 95% CI)")
    axes[0][0].legend(fontsize=6, loc="lower left")
    sel = trajectory["selection"]
    prob = np.asarray(sel["oof_probability"])
    y = np.asarray(trajectory["labels"])
    logit = np.log(np.clip(prob, 1e-6, 1 - 1e-6) / np.clip(1 - prob, 1e-6, 1))
    ax = axes[0][-2]
    bins = np.linspace(logit.min(), logit.max() + 1e-9, 20)
    ax.hist(logit[y == 1], bins=bins, alpha=0.6, color="tab:green", label="correct")
    ax.hist(logit[y == 0], bins=bins, alpha=0.6, color="tab:red", label="incorrect")
    cells_chosen = len(sel["chosen_per_fold"])
    ax.set_title("held-out logits of the selection procedure\n"
                 f"(nested CV; the folds chose {cells_chosen} cell{'s' if cells_chosen > 1 else ''})", fontsize=8)
    ax.set_xlabel("held-out probe logit")
    ax.set_ylabel("traces")
    ax.legend(fontsize=7)
    _reliability(axes[0][-1], [(sel["calibration"], "tab:blue", "nested predictions"),
                               (sel["calibrated"]["calibration"], "tab:purple", "after Platt scaling")],
                 "mean predicted P(correct)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reliability(ax, curves, xlabel: str) -> None:
    """Reliability diagram: fraction correct against mean prediction per bin, the diagonal and the base rate."""
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="perfectly calibrated")
    for cal, color, label in curves:
        curve = cal["reliability_curve"]
        ax.plot([b["mean_predicted"] for b in curve], [b["fraction_correct"] for b in curve], "o-", color=color,
                label=f"{label} (Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f})")
    base = curves[0][0]["reference"]["base_rate"]
    ax.axhline(base, color="black", lw=0.6, ls="--", label=f"base rate {base:.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction correct")
    ax.set_title("reliability diagram", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")


def _errorbars(ax, x, values, color, marker, label, offset, line=False) -> None:
    val = np.array([v["value"] for v in values], float)
    ci = np.array([v["ci"] for v in values], float)
    ax.errorbar(x + offset, val, yerr=[val - ci[:, 0], ci[:, 1] - val], fmt=marker + ("-" if line else ""),
                color=color, capsize=2, ms=4, lw=1, label=label)


def token_probe(token: dict, path) -> None:
    """AUROC by relative position, and mean projection curves of correct and incorrect traces with their CIs."""
    dirs = token["directions"]
    nb = token["position_bins"]
    x = (np.arange(nb) + 0.5) / nb
    fig, axes = plt.subplots(1, 1 + len(dirs), figsize=(4 * (1 + len(dirs)), 3.4), squeeze=False)
    ax = axes[0][0]
    for name, color in zip(dirs, ("tab:blue", "tab:purple")):
        vals = np.array([b["value"] for b in dirs[name]["auroc_by_position"]], float)
        ci = np.array([b["ci"] for b in dirs[name]["auroc_by_position"]], float)
        ax.plot(x, vals, "o-", color=color, label=f"{name} (band: 95% CI)")
        ax.fill_between(x, ci[:, 0], ci[:, 1], color=color, alpha=0.15)
    _chance(ax, label=True)
    ax.set_xlabel("relative position in the generated trace")
    ax.set_ylabel("token ROC-AUC (held-out problems)")
    ax.set_title(f"how early does the signal tell? (layer {token['layer']})", fontsize=9)
    ax.legend(fontsize=7)
    for ax, name in zip(axes[0][1:], dirs):
        for label, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
            c = dirs[name]["projection_curves"][label]
            ax.plot(x, c["mean"], color=color, label=f"{label} traces")
            ax.fill_between(x, c["lower"], c["upper"], color=color, alpha=0.2)
        ax.axhline(0, color="gray", lw=0.8, ls=":", label="midpoint of the class means")
        ax.set_title(f"mean projection on the {name} direction\n(bands: 95% CI of the mean over held-out traces)",
                     fontsize=8)
        ax.set_xlabel("relative position in the generated trace")
        ax.set_ylabel("projection - midpoint (activation units)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chunk_probe(result: dict, path) -> None:
    """Chunk-end probe AUROC by layer with CIs beside its baselines; reliability diagram of the nested predictions."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    ax = axes[0][0]
    layers = np.array([c["layer"] for c in result["layers"]], float)
    _errorbars(ax, layers, [c["metrics"]["auroc"] for c in result["layers"]], "tab:blue", "o",
               "probe (grouped CV)", 0.0, line=True)
    right = layers.max() + 1.0
    styles = {"position": ("tab:orange", "s"), "tokens_so_far": ("tab:brown", "D"), "confidence": ("tab:green", "^"),
              "equals_final": ("tab:purple", "v")}
    nested = result["selection"]["nested_metrics"]["auroc"]
    _errorbars(ax, np.array([right]), [nested], "black", "*", "selection procedure (nested)", 0.0)
    for j, (name, b) in enumerate(result["baselines"].items()):
        color, marker = styles.get(name, ("gray", "x"))
        _errorbars(ax, np.array([right]), [b["auroc"]], color, marker, name.replace("_", " "), 0.15 * (j + 1))
    _chance(ax, label=True)
    ax.set_xticks(list(layers) + [right])
    ax.set_xticklabels([str(int(x)) for x in layers] + ["nested /\nbaselines"], fontsize=7)
    ax.set_ylim(0.2, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("chunk ROC-AUC (95% CI)")
    ax.set_title("does the chunk end know its answer is right?", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    _reliability(axes[0][1], [(result["selection"]["calibration"], "tab:blue", "nested predictions")],
                 "predicted P(intermediate answer correct)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def early_exit(result: dict, path) -> None:
    """Accuracy against tokens used for each exit rule over its settings, the full-trace point, and each rule's
    nested headline point with its 95% CIs."""
    exit_ = result["early_exit"]
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    styles = {"probe": ("tab:blue", "o"), "confidence": ("tab:green", "^"), "fixed_fraction": ("tab:orange", "s"),
              "first_answer": ("tab:purple", "v")}
    for name, curve in exit_["curves"].items():
        color, marker = styles[name]
        ax.plot([c["tokens_used"] for c in curve], [c["accuracy"] for c in curve], "-", color=color, alpha=0.5,
                lw=1, label=f"{name.replace('_', ' ')} rule, every setting")
    for name, r in exit_["rules"].items():
        color, marker = styles[name]
        used = 1 - r["tokens_saved"]
        ax.errorbar([used], [r["accuracy"]],
                    xerr=[[used - (1 - r["tokens_saved_ci"][1])], [(1 - r["tokens_saved_ci"][0]) - used]],
                    yerr=[[r["accuracy"] - r["accuracy_ci"][0]], [r["accuracy_ci"][1] - r["accuracy"]]],
                    fmt=marker, color=color, ms=7, capsize=2, label=f"{name.replace('_', ' ')}: nested choice")
    full = exit_["full"]["accuracy"]
    ax.plot([1.0], [full], "k*", ms=12, label=f"full traces (accuracy {full:.3f})")
    ax.axhline(full - exit_["margin"], color="gray", lw=0.8, ls=":", label=f"full accuracy - margin {exit_['margin']}")
    ax.set_xlabel("generated tokens used (fraction of the full traces')")
    ax.set_ylabel("accuracy over traces")
    ax.set_xlim(0, 1.05)
    ax.set_title("early exit: stop at the first confident chunk\n(thresholds chosen on training folds; 95% CIs "
                 "over problems)", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
