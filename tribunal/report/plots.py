"""Figures people would rather look at than read: probe metrics by layer, separation, token signal over time."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BASELINE_STYLE = {"length": ("tab:orange", "--"), "confidence": ("tab:green", "--"),
                  "random_direction": ("tab:gray", ":"), "majority": ("black", ":")}


def probe_results(trajectory: dict, y, path) -> None:
    """AUROC by layer with 95% CIs and baselines, one panel per aggregation; logit separation of the chosen cell."""
    cells = trajectory["cells"]
    aggs = sorted({c["aggregation"] for c in cells})
    fig, axes = plt.subplots(1, len(aggs) + 1, figsize=(3.2 * (len(aggs) + 1), 3.4), squeeze=False)
    for ax, agg in zip(axes[0], aggs):
        row = sorted((c for c in cells if c["aggregation"] == agg), key=lambda c: c["layer"])
        layers = [c["layer"] for c in row]
        val = np.array([c["metrics"]["auroc"]["value"] for c in row])
        ci = np.array([c["metrics"]["auroc"]["ci"] for c in row])
        ax.errorbar(layers, val, yerr=[val - ci[:, 0], ci[:, 1] - val], fmt="o-", color="tab:blue", capsize=3,
                    label="probe")
        for name, (color, style) in BASELINE_STYLE.items():
            if name in row[0]["baselines"]:
                ax.plot(layers, [c["baselines"][name]["auroc"]["value"] for c in row], style, color=color, label=name)
        ax.axhline(0.5, color="lightgray", lw=0.8)
        ax.set_ylim(0.3, 1.02)
        ax.set_title(agg + (f" (k={row[0]['k']})" if row[0].get("k") else ""))
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
    axes[0][0].set_ylabel("ROC-AUC (grouped CV, 95% CI)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    chosen = trajectory["selection"]["chosen"]
    prob = np.asarray(trajectory["selection"]["oof_probability"])
    logit = np.log(np.clip(prob, 1e-6, 1 - 1e-6) / np.clip(1 - prob, 1e-6, 1))
    y = np.asarray(y)
    ax = axes[0][-1]
    bins = np.linspace(logit.min(), logit.max() + 1e-9, 20)
    ax.hist(logit[y == 1], bins=bins, alpha=0.6, color="tab:green", label="correct")
    ax.hist(logit[y == 0], bins=bins, alpha=0.6, color="tab:red", label="incorrect")
    ax.set_title(f"nested-CV logits (layer {chosen['layer']}, {chosen['aggregation']})", fontsize=9)
    ax.set_xlabel("held-out probe logit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_probe(token: dict, path) -> None:
    """AUROC by relative position, and mean projection curves of correct and incorrect traces with bands."""
    dirs = token["directions"]
    nb = token["position_bins"]
    x = (np.arange(nb) + 0.5) / nb
    fig, axes = plt.subplots(1, 1 + len(dirs), figsize=(4 * (1 + len(dirs)), 3.4), squeeze=False)
    ax = axes[0][0]
    for name, color in zip(dirs, ("tab:blue", "tab:purple")):
        vals = np.array([b["value"] for b in dirs[name]["auroc_by_position"]], float)
        ci = np.array([b["ci"] for b in dirs[name]["auroc_by_position"]], float)
        ax.plot(x, vals, "o-", color=color, label=name)
        ax.fill_between(x, ci[:, 0], ci[:, 1], color=color, alpha=0.15)
    ax.axhline(0.5, color="lightgray", lw=0.8)
    ax.set_xlabel("relative position in the generated trace")
    ax.set_ylabel("token ROC-AUC (held-out problems)")
    ax.set_title(f"how early does the signal tell? (layer {token['layer']})", fontsize=9)
    ax.legend(fontsize=7)
    for ax, name in zip(axes[0][1:], dirs):
        for label, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
            c = dirs[name]["projection_curves"][label]
            ax.plot(x, c["mean"], color=color, label=label)
            ax.fill_between(x, c["lower"], c["upper"], color=color, alpha=0.2)
        ax.set_title(f"mean projection on the {name} direction", fontsize=9)
        ax.set_xlabel("relative position")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
