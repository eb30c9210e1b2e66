"""The figures' rules, checked on the drawn artists of real probe results: a grid of panels, legends outside the
data, every error bar and band inside its axes, distributions as outlines, reliability bins of at least
MIN_BIN_TRACES with their counts, and early-exit rules that cannot hide one another."""

import copy

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

from tribunal.report.plots import (MIN_BIN_TRACES, STEERING_PANELS, chunk_probe_figure, early_exit_figure,
                                   merge_small_bins, probe_results_figure, steering_figure, token_probe_figure)

from .test_outputs import probe_run

# the embedded demo's nested reliability bins: most hold fewer than ten traces
DEMO_BINS = [(0.03, 0.38, 32), (0.19, 0.78, 9), (0.26, 0.40, 5), (0.37, 0.70, 10), (0.47, 0.29, 7), (0.52, 0.0, 1),
             (0.64, 0.88, 8), (0.75, 0.0, 4), (0.86, 0.0, 2), (0.98, 0.59, 22)]


@pytest.fixture
def run(tmp_path_factory):
    yield probe_run(tmp_path_factory)
    plt.close("all")


def figures(run):
    traj, tok, chunks = run["traj"]["result"], run["tok"]["token"], run["chunks"]["result"]
    return {"probe_results": probe_results_figure(traj), "token_probe": token_probe_figure(tok),
            "chunk_probe": chunk_probe_figure(chunks), "early_exit": early_exit_figure(chunks)}


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def data_axes(fig):
    return [ax for ax in fig.axes if ax.axison]


def demo_calibration():
    curve = [{"bin": [i / 10, (i + 1) / 10], "mean_predicted": m, "fraction_correct": f, "count": n}
             for i, (m, f, n) in enumerate(DEMO_BINS)]
    return {"brier": 0.357, "ece": 0.372, "reliability_curve": curve,
            "reference": {"base_rate": 0.5, "brier_constant_half": 0.25, "brier_constant_base_rate": 0.25}}


def test_probe_results_is_a_grid_two_panels_wide(run):
    fig = probe_results_figure(run["traj"]["result"])
    drawn(fig)
    axes = data_axes(fig)
    assert len(axes) == 7  # five aggregations, the held-out logits, the reliability diagram
    columns = {round(ax.get_position().x0, 2) for ax in axes}
    rows = {round(ax.get_position().y0, 2) for ax in axes}
    assert len(columns) == 2 and len(rows) >= 3, (columns, rows)
    width, height = fig.get_size_inches()
    assert width * fig.dpi <= 1200 and width / height <= 1.5


@pytest.mark.parametrize("name", ["probe_results", "token_probe", "chunk_probe", "early_exit"])
def test_legends_sit_outside_every_axes_data_area(run, name):
    fig = figures(run)[name]
    renderer = drawn(fig)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in data_axes(fig):
            assert not box.overlaps(ax.get_window_extent(renderer)), (name, ax.get_title(), legend.texts[0].get_text())


@pytest.mark.parametrize("name", ["probe_results", "token_probe", "chunk_probe", "early_exit"])
def test_every_error_bar_and_band_lies_inside_its_axes(run, name):
    run = copy.deepcopy(run)
    cell = run["traj"]["result"]["cells"][0]
    cell["baselines"]["random_direction"]["auroc"] = {"value": 0.35, "ci": [0.08, 0.6]}  # far below chance
    run["chunks"]["result"]["baselines"]["equals_final"]["auroc"] = {"value": 0.3, "ci": [0.1, 0.55]}
    fig = figures(run)[name]
    drawn(fig)
    checked = 0
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                for bars in container.lines[2]:
                    for segment in bars.get_segments():
                        for x, y in segment:
                            assert x0 <= x <= x1 and y0 <= y <= y1, (name, ax.get_title(), (x, y), (x0, x1, y0, y1))
                            checked += 1
        for band in ax.collections:
            if isinstance(band, PolyCollection):
                for path in band.get_paths():
                    ys = path.vertices[:, 1]
                    assert y0 <= ys.min() and ys.max() <= y1, (name, ax.get_title())
                    checked += 1
    assert checked


def test_held_out_logits_are_outlines_that_cannot_mix_colours(run):
    for fig in (probe_results_figure(run["traj"]["result"]), chunk_probe_figure(run["chunks"]["result"])):
        (ax,) = [ax for ax in fig.axes if "held-out logits" in ax.get_title()]
        assert len(ax.patches) == 2 and not any(p.get_fill() for p in ax.patches)
        labels = [t.get_text() for t in ax.get_legend().texts]
        assert [label.split()[0] for label in labels] == ["correct", "incorrect"], labels


def test_merging_small_reliability_bins_keeps_every_prediction():
    curve = demo_calibration()["reliability_curve"]
    merged = merge_small_bins(curve, MIN_BIN_TRACES)
    assert all(b["count"] >= MIN_BIN_TRACES for b in merged)
    assert sum(b["count"] for b in merged) == sum(b["count"] for b in curve)
    assert [b["count"] for b in merged] == [32, 14, 10, 16, 28]  # 9+5; 10; 7+1+8; 4+2+22
    assert merged[1]["bin"] == [0.1, 0.3] and merged[1]["mean_predicted"] == pytest.approx((0.19 * 9 + 0.26 * 5) / 14)
    assert [b["count"] for b in merge_small_bins(curve[1:3], MIN_BIN_TRACES)] == [14]
    assert merge_small_bins(curve[2:3], MIN_BIN_TRACES) == []  # 5 predictions in all: no bin to draw


def test_reliability_bins_under_the_minimum_are_not_drawn_and_each_shows_its_count(run):
    traj = copy.deepcopy(run["traj"]["result"])
    traj["selection"]["calibration"] = demo_calibration()
    fig = probe_results_figure(traj)
    (ax,) = [ax for ax in fig.axes if "reliability" in ax.get_title()]
    (line,) = [ln for ln in ax.lines if ln.get_label().startswith("nested predictions")]
    small = {m for m, _, n in DEMO_BINS if n < MIN_BIN_TRACES}
    assert not small & set(line.get_xdata()) and len(line.get_xdata()) == 5
    counts = [int(t.get_text()) for t in ax.texts if t.get_color() == line.get_color()]
    assert counts == [32, 14, 10, 16, 28]


def coincident_exit(chunks):
    """The embedded demo's case: every rule lands on one point with the same CIs."""
    result = copy.deepcopy(chunks)
    exit_ = result["early_exit"]
    for r in exit_["rules"].values():
        r.update(accuracy=0.5, accuracy_ci=[0.35, 0.65], tokens_saved=0.25, tokens_saved_ci=[0.2, 0.3],
                 accuracy_change=0.0, accuracy_change_ci=[0.0, 0.0])
    return result


def test_early_exit_rules_on_one_point_stay_visible(run):
    fig = early_exit_figure(coincident_exit(run["chunks"]["result"]))
    curves = next(ax for ax in fig.axes if ax.get_legend() is not None and ax.lines)
    chosen = [ln for ln in curves.lines if ln.get_label().endswith("nested choice")]
    assert len(chosen) == 4
    assert len({(ln.get_marker(), ln.get_markersize()) for ln in chosen}) == 4  # one inside the other, not on top
    assert all(ln.get_markerfacecolor() == "none" for ln in chosen)
    every = [ln for ln in curves.lines if "every" in ln.get_label()]
    assert len(every) == 3  # probe, confidence, fixed fraction: their curves run together in the demo
    widths = [ln.get_linewidth() for ln in every]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3  # a thin line inside a wide one
    assert all((ln.get_alpha() or 1.0) >= 0.4 for ln in every)
    # the CIs: one row per rule, so equal intervals cannot cover one another
    forests = [ax for ax in fig.axes if ax is not curves and ax.containers]
    assert len(forests) == 2
    for ax in forests:
        rows = [c.lines[0].get_ydata()[0] for c in ax.containers]
        assert len(set(rows)) == len(rows) == 4


def test_chunk_baselines_each_have_a_row(run):
    fig = chunk_probe_figure(run["chunks"]["result"])
    (ax,) = [ax for ax in fig.axes if "against the baselines" in ax.get_title()]
    rows = [c.lines[0].get_ydata()[0] for c in ax.containers]
    assert len(rows) == 1 + len(run["chunks"]["result"]["baselines"]) == len(set(rows))


def test_overlapping_ci_bands_are_outlines(run):
    fig = token_probe_figure(run["tok"]["token"])
    bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 + 2 * len(run["tok"]["token"]["directions"])
    assert all(not band.get_facecolor()[:, 3].any() for band in bands)  # no fill to mix colours


def steering_result():
    """A steering report's arms: the direction at -4, +4, +8 (+8 with a wide CI), three random directions at +-4
    and +8, and the ablation arm; (value, CI low, CI high) the same for every outcome."""
    def arm(name, kind, alpha, index, effect):
        effects = None if effect is None else {o: {"value": effect[0], "ci": [effect[1], effect[2]]}
                                               for o in STEERING_PANELS}
        return {"name": name, "kind": kind, "alpha": alpha, "random_index": index, "effects": effects,
                "accuracy": 0.4, "mean_tokens": 812.3, "cues_per_trace": 3.1, "answer_changed": 0.0}

    arms = [arm("baseline", "baseline", 0.0, None, None),
            arm("direction_a-4", "direction", -4.0, None, (-0.1, -0.2, 0.0)),
            arm("direction_a+4", "direction", 4.0, None, (0.2, 0.1, 0.3)),
            arm("direction_a+8", "direction", 8.0, None, (0.3, -0.4, 0.9)),
            arm("ablation", "ablation", None, None, (-0.5, -0.8, -0.2))]
    for i in range(3):
        arms += [arm(f"random{i}_a{a:+g}", "random", a, i, (0.02 * (i - 1) * a, 0, 0)) for a in (-4.0, 4.0, 8.0)]
    return {"arms": arms}


def test_the_steering_figure_is_a_grid_of_outcomes_with_bands_lines_and_the_ablation_apart():
    fig = steering_figure(steering_result())
    renderer = drawn(fig)
    axes = data_axes(fig)
    assert len(axes) == 4
    assert len({round(ax.get_position().x0, 2) for ax in axes}) == 2 == len({round(ax.get_position().y0, 2)
                                                                             for ax in axes})
    assert fig.get_size_inches()[0] * fig.dpi <= 1200
    (legend,) = fig.legends
    for ax in axes:
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)), ax.get_title()
        randoms = [ln for ln in ax.lines if ln.get_color() == "dimgray"]
        assert len(randoms) == 3 and all(ln.get_linewidth() < 1 for ln in randoms)
        assert [list(ln.get_xdata()) for ln in randoms] == [[-4.0, 0.0, 4.0, 8.0]] * 3  # through the baseline
        (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
        ys = band.get_paths()[0].vertices[:, 1]
        scale = 100 if "accuracy" in ax.get_title() or "answer" in ax.get_title() else 1
        assert ys.min() == pytest.approx(-0.16 * scale) and ys.max() == pytest.approx(0.16 * scale)  # random at +-8
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["-4", "0", "4", "8", "ablate"]
        (ablation,) = [c for c in ax.containers if c.lines[0].get_marker() == "D"]
        assert ablation.lines[0].get_xdata()[0] > 8 and ablation.lines[0].get_ydata()[0] == pytest.approx(-0.5 * scale)
        (star,) = [ln for ln in ax.lines if ln.get_marker() == "*"]
        assert (list(star.get_xdata()), list(star.get_ydata())) == ([0.0], [0.0])
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        for container in ax.containers:
            for bars in container.lines[2]:
                for segment in bars.get_segments():
                    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in segment), ax.get_title()
    assert "accuracy (baseline 40.0%)" in [ax.get_title() for ax in axes]
