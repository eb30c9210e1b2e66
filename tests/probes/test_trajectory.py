"""Probes on synthetic stores with a planted truth, through the library and the CLI."""

import json

import numpy as np
from sklearn.model_selection import StratifiedKFold

from conftest import planted_direction as planted
from conftest import probe_store as synth
from tribunal.probes import evaluation as ev
from tribunal.probes.search import cv_predict, make_probe
from tribunal.probes.trajectory import load_trajectory_data
from tribunal.report.outputs import trajectory_outputs
from tribunal.store import open_store

FAST = dict(permutations=20, progress=False)


def ungrouped_auroc(data, key, folds: int = 5, seed: int = 0) -> float:
    """The leaky estimate (samples of a problem on both sides of a split): what grouping prevents."""
    split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.y, data.y))
    return ev.metrics(data.y, cv_predict(make_probe, data.features[key], data.y, split))["auroc"]


def cell(result, layer, agg):
    return next(c for c in result["result"]["cells"] if c["layer"] == layer and c["aggregation"] == agg)


def test_planted_direction_is_recovered(tmp_path):
    path = synth(tmp_path / "s.h5", traces=1200, problems=300)
    out = trajectory_outputs(path, tmp_path / "out", aggregations=("mean", "last"), **FAST)
    w, truth = planted(path)
    c = cell(out, 4, "mean")
    assert abs(np.dot(c["direction"], w)) > 0.9
    lo, hi = c["metrics"]["auroc"]["ci"]
    assert lo <= truth["signal"] <= hi
    assert c["beats"]["permutation"] and c["beats"]["length"] and c["beats"]["random_direction"]
    doc = json.loads((tmp_path / "out" / "implicit_value_directions.json").read_text())
    assert doc["provenance"]["stores"][0]["size_bytes"] > 0 and doc["trajectory"]["selection"]["method"].startswith("nested")
    assert len(doc["trajectory"]["cells"][0]["direction"]) == 24
    for name in ("metrics.csv", "probe_results.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_no_signal_is_not_significant(tmp_path):
    path = synth(tmp_path / "s.h5", signal=0.5)
    out = trajectory_outputs(path, tmp_path / "out", layers=[4], aggregations=("mean",), **FAST)
    c = cell(out, 4, "mean")
    lo, hi = c["metrics"]["auroc"]["ci"]
    assert lo <= 0.5 <= hi
    assert c["permutation_p"] > 0.05 and not c["beats"]["permutation"]
    assert "not significant" in out["summary"]


def test_problem_leak_grouped_stays_near_chance_ungrouped_does_not(tmp_path):
    path = synth(tmp_path / "s.h5", traces=400, problems=40, signal=0.5, problem_leak=0.95, d_model=64)
    with open_store(path) as store:
        data = load_trajectory_data(store, [4], ("mean",))
    leaky = ungrouped_auroc(data, (4, "mean"))
    out = trajectory_outputs(path, tmp_path / "out", layers=[4], aggregations=("mean",), **FAST)
    grouped = cell(out, 4, "mean")["metrics"]["auroc"]
    assert leaky > 0.85, leaky
    assert grouped["value"] < 0.65 and grouped["ci"][0] < 0.5 + 0.1


def test_length_confound_is_reported(tmp_path):
    path = synth(tmp_path / "s.h5", signal=0.5, length_confound=0.6)
    out = trajectory_outputs(path, tmp_path / "out", layers=[4], aggregations=("mean",), **FAST)
    c = cell(out, 4, "mean")
    assert c["baselines"]["length"]["auroc"]["value"] > 0.75
    assert abs(c["metrics"]["auroc"]["value"] - c["baselines"]["length"]["auroc"]["value"]) < 0.1
    assert not c["beats"]["length"]
    assert "does NOT beat the trace-length baseline" in out["summary"]


def test_shards_read_together(tmp_path):
    synth(tmp_path / "a.h5", traces=200, problems=50, seed=1)
    out = trajectory_outputs(str(tmp_path / "a.h5"), tmp_path / "o", layers=[4], aggregations=("mean",), **FAST)
    assert out["document"]["provenance"]["traces"] == 200
