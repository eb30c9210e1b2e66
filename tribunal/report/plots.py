"""Figures people would rather look at than read: probe metrics by layer, separation, calibration, token signal.

Each `*_figure` builds a figure from what a probe returned and `save` writes it. The rules every figure keeps,
so it reads at page width: panels in a grid two wide (never a long row), legends outside the data, axis limits
taken from the data and its CIs (no error bar is cut off), overlapping distributions and CI bands drawn as
outlines (no fills to mix into a third colour), reliability bins of fewer than MIN_BIN_TRACES merged with their
neighbours (each drawn bin shows its count), and points that could coincide drawn where they cannot hide each
other (dodged, nested hollow markers, or one row each).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110
PANEL = (4.9, 3.1)  # inches per panel: two side by side make a figure 1078 px wide
MIN_BIN_TRACES = 10  # a reliability bin with fewer predictions is merged with its neighbour before it is drawn

BASELINE_STYLE = {"length": ("tab:orange", "s"), "confidence": ("tab:green", "^"),
                  "random_direction": ("tab:gray", "v"), "majority": ("black", "x")}
CHUNK_BASELINE_STYLE = {"position": ("tab:orange", "s"), "tokens_so_far": ("tab:brown", "D"),
                        "confidence": ("tab:green", "^"), "equals_final": ("tab:purple", "v")}
# (colour, marker, marker size, line style, line width, line alpha): hollow markers of distinct shapes and sizes, so
# rules that land on one point stay visible one inside the other; curves of decreasing width, widest drawn first,
# so curves that run together show as a thin line inside a wide one
EXIT_STYLE = {"probe": ("tab:blue", "o", 15, "-", 5.0, 0.4), "confidence": ("tab:green", "^", 11, "--", 2.4, 0.9),
              "fixed_fraction": ("tab:orange", "s", 8, "-.", 1.2, 1.0),
              "first_answer": ("tab:purple", "D", 5, ":", 1.0, 1.0),
              "trial_answer": ("tab:red", "v", 9, (0, (3, 1, 1, 1)), 1.8, 0.9)}
LABEL_COLOURS = (("correct", 1, "tab:green"), ("incorrect", 0, "tab:red"))


def save(fig, path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _grid(rows: int):
    """Panels two wide: `rows` rows of PANEL-sized axes."""
    return plt.subplots(rows, 2, figsize=(2 * PANEL[0], rows * PANEL[1]), squeeze=False, layout="constrained")


def _name(key: str) -> str:
    return key.replace("_", " ")


def _legend_below(ax, ncol: int = 2) -> None:
    """A legend under the axes (below its x label), never over the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=7, frameon=False)


def _legend_slot(ax, handles, labels) -> None:
    """A grid cell with no data of its own holds the legend its neighbours share."""
    ax.axis("off")
    ax.legend(handles, labels, loc="center", fontsize=8, frameon=False)


def _limits(values, include=(0.5,), pad: float = 0.04) -> tuple[float, float]:
    """Axis limits that hold every value (CI ends; the chance line), with a margin so caps are not on the frame."""
    values = [v for v in [*values, *include] if math.isfinite(v)]
    lo, hi = min(values), max(values)
    margin = max(hi - lo, 0.05) * pad
    return lo - margin, hi + margin


def _chance(ax) -> None:
    ax.axhline(0.5, color="gray", lw=0.8, ls=":", label="chance (0.5)")


def _errorbars(ax, x, values, color, marker, label, line=False) -> None:
    val = np.array([v["value"] for v in values], float)
    ci = np.array([v["ci"] for v in values], float)
    yerr = [np.maximum(val - ci[:, 0], 0), np.maximum(ci[:, 1] - val, 0)]
    ax.errorbar(x, val, yerr=yerr, fmt=marker + ("-" if line else ""), color=color, capsize=2, ms=5, lw=1,
                label=label)


def _band(ax, x, lower, upper, color) -> None:
    """A CI band as its dashed outline: two classes' bands overlap without mixing into a third colour."""
    ax.fill_between(x, lower, upper, facecolor="none", edgecolor=color, ls="--", lw=0.9)


def _dodge(layers: np.ndarray, series: int) -> np.ndarray:
    """x offsets that put `series` markers side by side within each layer's slot, none on another."""
    spacing = np.min(np.diff(layers)) if len(layers) > 1 else 1.0
    step = 0.75 * spacing / series
    return (np.arange(series) - (series - 1) / 2) * step


def _layer_axis(ax, layers: np.ndarray) -> None:
    spacing = np.min(np.diff(layers)) if len(layers) > 1 else 1.0
    ax.set_xticks(layers)
    ax.set_xlim(layers[0] - 0.6 * spacing, layers[-1] + 0.6 * spacing)
    ax.set_xlabel("layer")


def _ring(ax, x, y, label) -> None:
    ax.plot([x], [y], "o", ms=13, mfc="none", mec="black", mew=1.2, label=label)


def probe_results_figure(trajectory: dict):
    """Per aggregation, ROC-AUC by layer with 95% CIs beside the baselines (each with its CI), the direction cell
    ringed; then the held-out logits of the folds' choices (nested CV) and their reliability diagram before and
    after Platt scaling. The aggregation panels share one y axis, set from every CI drawn."""
    cells = trajectory["cells"]
    sel = trajectory["selection"]
    final = sel["final"]
    aggs = sorted({c["aggregation"] for c in cells})
    names = [name for name in BASELINE_STYLE if name in cells[0]["baselines"]]
    agg_rows = math.ceil((len(aggs) + 1) / 2)  # +1: the shared legend's cell
    fig, axes = _grid(agg_rows + 1)
    flat = list(axes[:agg_rows].flat)
    every = [c["metrics"]["auroc"] for c in cells] + [c["baselines"][n]["auroc"] for c in cells for n in names]
    ylim = _limits([end for m in every for end in m["ci"]])
    for ax, agg in zip(flat, aggs):
        row = sorted((c for c in cells if c["aggregation"] == agg), key=lambda c: c["layer"])
        layers = np.array([c["layer"] for c in row], float)
        offsets = _dodge(layers, 1 + len(names))
        _errorbars(ax, layers + offsets[0], [c["metrics"]["auroc"] for c in row], "tab:blue", "o",
                   "probe (per cell, grouped CV)", line=True)
        for j, name in enumerate(names, start=1):
            color, marker = BASELINE_STYLE[name]
            _errorbars(ax, layers + offsets[j], [c["baselines"][name]["auroc"] for c in row], color, marker,
                       f"{_name(name)} baseline")
        if agg == final["aggregation"]:
            value = next(c for c in row if c["layer"] == final["layer"])["metrics"]["auroc"]["value"]
            _ring(ax, final["layer"] + offsets[0], value, f"the direction cell (layer {final['layer']}, {agg})")
        _chance(ax)
        ax.set_ylim(*ylim)
        ax.set_title(agg + (f" (k={row[0]['k']})" if row[0].get("k") else ""), fontsize=9)
        _layer_axis(ax, layers)
        ax.set_ylabel("ROC-AUC (95% CI)")
    handles = {}
    for ax in flat[:len(aggs)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    _legend_slot(flat[len(aggs)], list(handles.values()), list(handles))
    for ax in flat[len(aggs) + 1:]:
        ax.axis("off")
    chosen = len(sel["chosen_per_fold"])
    _logit_histogram(axes[-1][0], sel["oof_probability"], trajectory["labels"], "traces",
                     "held-out logits of the folds' choices (nested CV;\n"
                     f"the folds chose {chosen} cell{'s' if chosen > 1 else ''})")
    _reliability(axes[-1][1], [(sel["calibration"], "tab:blue", "nested predictions"),
                               (sel["calibrated"]["calibration"], "tab:purple", "after Platt scaling")],
                 "mean predicted P(correct)")
    return fig


def _logit_histogram(ax, probability, labels, unit: str, title: str) -> None:
    """Held-out logits of each class as outlines (no filled bars to overlap and mix colours)."""
    prob, y = np.asarray(probability, float), np.asarray(labels)
    logit = np.log(np.clip(prob, 1e-6, 1 - 1e-6) / np.clip(1 - prob, 1e-6, 1))
    bins = np.linspace(logit.min(), logit.max() + 1e-9, 20)
    for name, value, color in LABEL_COLOURS:
        ax.hist(logit[y == value], bins=bins, histtype="step", lw=1.6, color=color,
                label=f"{name} {unit} ({int(np.sum(y == value))})")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("held-out probe logit")
    ax.set_ylabel(unit)
    _legend_below(ax)


def merge_small_bins(curve: list[dict], minimum: int = MIN_BIN_TRACES) -> list[dict]:
    """Reliability bins pooled left to right until each holds `minimum` predictions; a short remainder joins the
    last pooled bin. Fewer than `minimum` predictions in all: no bin."""
    pooled, pending = [], []
    for b in curve:
        pending.append(b)
        if sum(p["count"] for p in pending) >= minimum:
            pooled.append(_pool(pending))
            pending = []
    if pending and pooled:
        pooled[-1] = _pool([pooled[-1], *pending])
    return pooled


def _pool(bins: list[dict]) -> dict:
    n = sum(b["count"] for b in bins)
    return {"bin": [bins[0]["bin"][0], bins[-1]["bin"][1]], "count": n,
            "mean_predicted": sum(b["mean_predicted"] * b["count"] for b in bins) / n,
            "fraction_correct": sum(b["fraction_correct"] * b["count"] for b in bins) / n}


def _reliability(ax, curves, xlabel: str) -> None:
    """Fraction correct against mean prediction per bin (bins under MIN_BIN_TRACES merged), each bin's count
    beside it, with the diagonal and the base rate."""
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="perfectly calibrated")
    for i, (cal, color, label) in enumerate(curves):
        bins = merge_small_bins(cal["reliability_curve"])
        ax.plot([b["mean_predicted"] for b in bins], [b["fraction_correct"] for b in bins], "o-", color=color,
                ms=4, label=f"{label} (Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f})")
        for b in bins:
            ax.annotate(str(b["count"]), (b["mean_predicted"], b["fraction_correct"]), textcoords="offset points",
                        xytext=(0, 6 if i == 0 else -11), ha="center", fontsize=6, color=color)
    base = curves[0][0]["reference"]["base_rate"]
    ax.axhline(base, color="black", lw=0.6, ls="--", label=f"base rate {base:.2f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.08, 1.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction correct")
    ax.set_title(f"reliability diagram (number: predictions in the bin;\nbins under {MIN_BIN_TRACES} merged "
                 "with a neighbour)", fontsize=8)
    _legend_below(ax, ncol=1)


def token_probe_figure(token: dict):
    """AUROC by relative position, and mean projection curves of correct and incorrect traces with their CIs."""
    dirs = token["directions"]
    nb = token["position_bins"]
    x = (np.arange(nb) + 0.5) / nb
    panels = 1 + len(dirs)
    fig, axes = _grid(math.ceil((panels + 1) / 2))
    flat = list(axes.flat)
    ax = flat[0]
    for name, color in zip(dirs, ("tab:blue", "tab:purple")):
        vals = np.array([b["value"] for b in dirs[name]["auroc_by_position"]], float)
        ci = np.array([b["ci"] for b in dirs[name]["auroc_by_position"]], float)
        ax.plot(x, vals, "o-", color=color, ms=4, label=f"{name} (dashed: 95% CI)")
        _band(ax, x, ci[:, 0], ci[:, 1], color)
    _chance(ax)
    ax.set_xlabel("relative position in the generated trace")
    ax.set_ylabel("token ROC-AUC (held out)")
    ax.set_title(f"how early does the signal tell? (layer {token['layer']})", fontsize=9)
    _legend_below(ax, ncol=3)
    for ax, name in zip(flat[1:], dirs):
        for label, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
            c = dirs[name]["projection_curves"][label]
            ax.plot(x, c["mean"], color=color, label=f"{label} traces (dashed: 95% CI of the mean)")
            _band(ax, x, c["lower"], c["upper"], color)
        ax.axhline(0, color="gray", lw=0.8, ls=":", label="midpoint of the class means")
        ax.set_title(f"mean projection on the {name} direction", fontsize=9)
        ax.set_xlabel("relative position in the generated trace")
        ax.set_ylabel("projection - midpoint")
    handles, labels = flat[1].get_legend_handles_labels()
    _legend_slot(flat[panels], handles, labels)
    for ax in flat[panels + 1:]:
        ax.axis("off")
    return fig


def chunk_probe_figure(result: dict):
    """Chunk-end probe AUROC by layer (per layer, the direction cell ringed); the folds' choice (nested) beside the
    baselines, one row each; the reliability diagram and held-out logits of the nested predictions."""
    fig, axes = _grid(2)
    ax = axes[0][0]
    rows = result["layers"]
    layers = np.array([c["layer"] for c in rows], float)
    _errorbars(ax, layers, [c["metrics"]["auroc"] for c in rows], "tab:blue", "o", "probe (per layer, grouped CV)",
               line=True)
    final = result["selection"]["final"]
    value = next(c for c in rows if c["layer"] == final["layer"])["metrics"]["auroc"]["value"]
    _ring(ax, final["layer"], value, f"the direction cell (layer {final['layer']})")
    _chance(ax)
    ax.set_ylim(*_limits([end for c in rows for end in c["metrics"]["auroc"]["ci"]]))
    _layer_axis(ax, layers)
    ax.set_ylabel("chunk ROC-AUC (95% CI)")
    ax.set_title("does the chunk end know its answer is right?", fontsize=9)
    _legend_below(ax)

    ax = axes[0][1]
    nested = result["selection"]["nested_metrics"]["auroc"]
    entries = [("the folds' choice (nested)", nested, "black", "*")]
    for name, b in result["baselines"].items():
        color, marker = CHUNK_BASELINE_STYLE.get(name, ("gray", "x"))
        beaten = "beaten" if result["beats"].get(name) else "not beaten"
        entries.append((f"{_name(name)} ({beaten})", b["auroc"], color, marker))
    _forest(ax, entries, lines=[(0.5, ":")])
    ax.set_xlabel("chunk ROC-AUC (95% CI; same folds)")
    ax.set_title("the folds' choice against the baselines\n(beaten: the paired difference's 95% CI lies above 0)",
                 fontsize=8)

    _reliability(axes[1][0], [(result["selection"]["calibration"], "tab:blue", "nested predictions")],
                 "predicted P(intermediate answer correct)")
    _logit_histogram(axes[1][1], result["oof_probability"], result["labels"], "chunks",
                     "held-out logits of the folds' choice (nested CV)")
    return fig


def _forest(ax, entries, lines) -> None:
    """One row per entry (label, {"value", "ci"}, colour, marker): a point and its 95% CI, none on another;
    lines: (x, line style) reference lines."""
    for i, (label, m, color, marker) in enumerate(entries):
        v, (lo, hi) = m["value"], m["ci"]
        ax.errorbar([v], [i], xerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt=marker, color=color, ms=7, capsize=3,
                    lw=1.2)
    for x, style in lines:
        ax.axvline(x, color="gray", lw=0.8, ls=style)
    ax.set_yticks(range(len(entries)))
    ax.set_yticklabels([e[0] for e in entries], fontsize=7)
    ax.set_ylim(len(entries) - 0.5, -0.5)
    ax.set_xlim(*_limits([end for e in entries for end in e[1]["ci"]], [x for x, _ in lines], pad=0.08))


def early_exit_figure(result: dict):
    """Accuracy against tokens used for each exit rule over all its settings, with each rule's nested choice as a
    hollow marker; below, one row per rule: its accuracy change against the full traces and the tokens it saves,
    with 95% CIs over problems."""
    exit_ = result["early_exit"]
    fig, axes = plt.subplot_mosaic([["curves", "curves"], ["accuracy", "saved"]], layout="constrained",
                                   figsize=(2 * PANEL[0], 2.15 * PANEL[1]), height_ratios=[1.25, 1])
    ax = axes["curves"]
    for name, curve in sorted(exit_["curves"].items(), key=lambda kv: -EXIT_STYLE[kv[0]][4]):
        color, _, _, style, width, alpha = EXIT_STYLE[name]
        setting = "fraction" if name == "fixed_fraction" else "threshold"
        ax.plot([c["tokens_used"] for c in curve], [c["accuracy"] for c in curve], ls=style, color=color, lw=width,
                alpha=alpha, marker=".", ms=4, label=f"{_name(name)} rule, every {setting}")
    for name, r in exit_["rules"].items():
        color, marker, size = EXIT_STYLE[name][:3]
        ax.plot([1 - r["tokens_saved"]], [r["accuracy"]], marker, ms=size, mfc="none", mec=color, mew=1.6,
                label=f"{_name(name)}: nested choice")
    full = exit_["full"]["accuracy"]
    ax.plot([1.0], [full], "k*", ms=11, label=f"full traces (accuracy {full:.3f})")
    ax.axhline(full - exit_["margin"], color="gray", lw=0.8, ls=":", label=f"full accuracy - margin {exit_['margin']}")
    ax.set_xlabel("generated tokens used (fraction of the full traces')")
    ax.set_ylabel("accuracy over traces")
    accuracies = [c["accuracy"] for curve in exit_["curves"].values() for c in curve]
    accuracies += [r["accuracy"] for r in exit_["rules"].values()] + [full - exit_["margin"]]
    ax.set_ylim(*_limits(accuracies, include=(), pad=0.1))  # room for the largest hollow marker
    ax.set_xlim(0, 1.05)
    ax.set_title("early exit: each rule's accuracy and tokens over its settings\n(the nested choice: settings "
                 "chosen on training folds; its CIs in the panels below)", fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    rules = exit_["rules"]
    _forest(axes["accuracy"], [(_name(n), {"value": r["accuracy_change"], "ci": r["accuracy_change_ci"]},
                                *EXIT_STYLE[n][:2]) for n, r in rules.items()],
            lines=[(0.0, "-"), (-exit_["margin"], ":")])
    axes["accuracy"].set_xlabel("accuracy change against the full traces\n(dotted: the margin)")
    _forest(axes["saved"], [(_name(n), {"value": r["tokens_saved"], "ci": r["tokens_saved_ci"]}, *EXIT_STYLE[n][:2])
                            for n, r in rules.items()], lines=[(0.0, "-")])
    axes["saved"].set_xlabel("generated tokens saved (fraction)")
    return fig


TRANSFER_STYLE = {"trajectory": ("tab:blue", "o"), "token": ("tab:purple", "D"), "chunk": ("tab:orange", "s")}


def transfer_figure(result: dict):
    """In-distribution against transferred ROC-AUC, one point per probe (trajectory cell, token direction, chunk
    layer) with both 95% CIs as bars, the diagonal (kept what it had) and the chance lines; the legend beside it.
    result: probes.transfer's result (its `rows`)."""
    fig, axes = _grid(1)
    ax = axes[0][0]
    rows = result["rows"]
    ends = [0.5]
    for kind, (color, marker) in TRANSFER_STYLE.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        x = np.array([r["in_distribution"]["value"] for r in mine])
        y = np.array([r["transferred"]["value"] for r in mine])
        xci = np.array([r["in_distribution"]["ci"] for r in mine])
        yci = np.array([r["transferred"]["ci"] for r in mine])
        ax.errorbar(x, y, xerr=[np.maximum(x - xci[:, 0], 0), np.maximum(xci[:, 1] - x, 0)],
                    yerr=[np.maximum(y - yci[:, 0], 0), np.maximum(yci[:, 1] - y, 0)], fmt=marker, mfc="none",
                    color=color, ms=6, capsize=2, lw=0.8, alpha=0.9, label=f"{kind} ({len(mine)})")
        ends += [*xci.ravel(), *yci.ravel()]
    lo, hi = _limits(ends)
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="transferred = in distribution")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":", label="chance (0.5)")
    ax.axvline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("in distribution ROC-AUC (95% CI)")
    ax.set_ylabel("transferred ROC-AUC (95% CI)")
    ax.set_title("fit on the training stores: in distribution against\non the test stores", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    _legend_slot(axes[0][1], handles, labels)
    return fig


# outcome -> (panel title, y label, scale): shares are drawn in percent (percentage points for a change)
STEERING_PANELS = {"accuracy": ("accuracy", "change against the baseline\n(percentage points)", 100.0),
                   "mean_tokens": ("mean generated tokens per trace", "change against the baseline\n(tokens)", 1.0),
                   "cues_per_trace": ("reflection cues per trace", "change against the baseline\n(cues per trace)",
                                      1.0),
                   "answer_changed": ("final answer changed", "traces whose final answer\ndiffers (%)", 100.0)}
STEERING_LEVEL = {"accuracy": "{:.1%}", "mean_tokens": "{:.1f}", "cues_per_trace": "{:.2f}"}


def steering_figure(result: dict):
    """Dose response, one panel per outcome: each arm's change against the baseline (alpha = 0, a star) by alpha,
    the probe's direction with its 95% CIs, every random direction as a thin grey line and their min-to-max range
    as a shaded grey band (a range, not a CI, and one per panel: nothing for it to mix with), and the ablation
    arm at its own x position ("ablate") past a dotted line. result: report.steering_report's (its `arms`)."""
    arms = result["arms"]
    base = next(a for a in arms if a["kind"] == "baseline")
    direction = [a for a in arms if a["kind"] == "direction"]
    randoms = {}
    for a in arms:
        if a["kind"] == "random":
            randoms.setdefault(a["random_index"], []).append(a)
    ablation = [a for a in arms if a["kind"] == "ablation"]
    alphas = sorted({0.0, *(a["alpha"] for a in direction), *(a["alpha"] for rs in randoms.values() for a in rs)})
    spacing = float(np.min(np.diff(alphas))) if len(alphas) > 1 else 1.0
    ablate_x = [alphas[-1] + (1.5 + i) * spacing for i in range(len(ablation))]
    fig, axes = _grid(2)
    for ax, (outcome, (title, ylabel, scale)) in zip(axes.flat, STEERING_PANELS.items()):
        ends, band = [0.0], {}
        for k, (_, mine) in enumerate(sorted(randoms.items())):
            points = sorted([(0.0, 0.0), *((a["alpha"], scale * a["effects"][outcome]["value"]) for a in mine)])
            ax.plot(*zip(*points), color="dimgray", lw=0.7, alpha=0.8,
                    label="each random direction (same alpha)" if k == 0 else None)
            for x, y in points:
                band.setdefault(x, []).append(y)
        if randoms:
            xs = sorted(band)
            ax.fill_between(xs, [min(band[x]) for x in xs], [max(band[x]) for x in xs], color="tab:gray", alpha=0.2,
                            lw=0, label=f"the {len(randoms)} random directions: min to max")
            ends += [y for ys in band.values() for y in ys]
        if direction:
            points = sorted([(0.0, {"value": 0.0, "ci": [0.0, 0.0]}),
                             *((a["alpha"], _scaled(a["effects"][outcome], scale)) for a in direction)],
                            key=lambda p: p[0])
            _errorbars(ax, [x for x, _ in points], [v for _, v in points], "tab:blue", "o",
                       "the probe's direction (95% CI)", line=True)
            ends += [end for _, v in points for end in v["ci"]]
        for k, (x, a) in enumerate(zip(ablate_x, ablation)):
            e = _scaled(a["effects"][outcome], scale)
            v, (lo, hi) = e["value"], e["ci"]
            ax.errorbar([x], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt="D", color="tab:red", ms=6,
                        capsize=3, lw=1.2, label="ablation: the direction projected out (95% CI)" if k == 0 else None)
            ends += [lo, hi]
        ax.plot([0.0], [0.0], "k*", ms=10, label="baseline (alpha = 0)", zorder=3)
        ax.axhline(0, color="gray", lw=0.8, ls=":")
        if ablation:
            ax.axvline(alphas[-1] + 0.75 * spacing, color="black", lw=0.6, ls=":")
        ax.set_xticks([*alphas, *ablate_x], [f"{a:g}" for a in alphas] + ["ablate"] * len(ablate_x))
        ax.set_xlim(alphas[0] - 0.6 * spacing, (ablate_x or alphas)[-1] + 0.6 * spacing)
        ax.set_ylim(*_limits(ends, include=(), pad=0.08))
        level = STEERING_LEVEL.get(outcome)
        ax.set_title(f"{title} (baseline {level.format(base[outcome])})" if level else
                     f"{title} (share of each arm's traces)", fontsize=9)
        ax.set_xlabel("alpha (shift in units of sigma along the direction)")
        ax.set_ylabel(ylabel, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("steering: each arm against the baseline over the same (problem, sample) pairs and seeds\n"
                 "error bars: 95% problem-bootstrap CIs; grey: random directions (controls) at the same alpha",
                 fontsize=9)
    return fig


def _scaled(effect: dict, scale: float) -> dict:
    return {"value": scale * effect["value"], "ci": [scale * end for end in effect["ci"]]}
