"""The directions file round trip: `tribunal score` reproduces the trajectory probe's logits."""

import csv

import numpy as np
from click.testing import CliRunner

from conftest import synth_store
from tribunal.cli import main
from tribunal.probes import directions as dirs
from tribunal.probes.trajectory import load_trajectory_data, make_probe
from tribunal.report.outputs import trajectory_outputs
from tribunal.store import open_store

FAST = dict(permutations=20, progress=False)


def synth(path, **kw):
    return synth_store(path, **{**dict(traces=400, problems=100, layers=(2, 4), d_model=24, tokens_per_trace=(40, 120),
                                       signal=0.8), **kw})


def test_directions_round_trip_through_score(tmp_path):
    path = synth(tmp_path / "s.h5", traces=120, problems=30)
    trajectory_outputs(path, tmp_path / "out", layers=[2], aggregations=("mean",), **FAST)
    csv_path = tmp_path / "scores.csv"
    result = CliRunner().invoke(main, ["score", str(tmp_path / "out"), str(path), "--out", str(csv_path)])
    assert result.exit_code == 0, result.output
    doc = dirs.load(tmp_path / "out")
    c = dirs.pick_cell(doc)
    with open_store(path) as store:
        data = load_trajectory_data(store, [2], ("mean",))
        model = make_probe().fit(data.features[(2, "mean")], data.y)
        expected = model.decision_function(data.features[(2, "mean")])
        rows = list(csv.DictReader(open(csv_path)))
        assert len(rows) == store.n_tokens
    per_trace = {}
    for r in rows:
        if r["is_generated"] == "1":
            per_trace.setdefault(int(r["trace"]), []).append(float(r["logit"]))
    got = np.array([np.mean(per_trace[t]) for t in data.trace_index])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert c["layer"] == 2


def test_projection_sd_is_the_spread_over_generated_tokens(tmp_path):
    """steer's unit: the standard deviation of u . x over every generated token (prompt tokens left out)."""
    path = synth(tmp_path / "s.h5", traces=30, problems=10)
    u = np.random.default_rng(3).normal(size=24)
    with open_store(path) as store:
        values = []
        for i in range(store.n_traces):
            gen = store.trace(i).is_generated
            values.append(store.activations(4, i)[gen].astype(np.float64) @ u)
        assert store.table["prompt_length"].min() > 0
        expected = np.concatenate(values).std()
        assert np.isclose(dirs.projection_sd(store, 4, u, block_bytes=1 << 12), expected, rtol=1e-9)
