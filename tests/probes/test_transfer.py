"""Transfer (tribunal/probes/transfer.py) on synthetic stores with a planted truth: a direction shared by two stores
of independent traces transfers (CIs above 0.5), unrelated directions fall to chance (CIs cover 0.5, over several
seeds), and stores of another model, layer set, width or dtype, or sharing problems, are refused in one line with
nothing written."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_record, planted_direction, probe_store, writer_kwargs
from tribunal.cli import main
from tribunal.errors import TribunalError
from tribunal.probes.transfer import fate, transfer
from tribunal.store import StoreWriter
from tribunal.traces.models import piece_decoder
from tribunal.traces.synthetic import SYNTH_MODEL_ID

SMALL = dict(traces=200, problems=50, tokens_per_trace=(20, 40))
FAST = dict(aggregations=("mean", "last"), permutations=5)


@pytest.fixture(scope="module")
def same_direction(tmp_path_factory):
    """Two stores of independent traces (seeds 1 and 2) with one planted direction (direction seed 0), and
    `probe transfer` run on them through the command line."""
    root = tmp_path_factory.mktemp("transfer")
    a = probe_store(root / "a.h5", seed=1, direction_seed=0, **SMALL)
    b = probe_store(root / "b.h5", seed=2, direction_seed=0, **SMALL)
    out = root / "out"
    result = CliRunner().invoke(main, ["probe", "transfer", "--train", str(a), "--test", str(b), "--out", str(out),
                                       "--aggregations", "mean,last", "--permutations", "5", "--quiet"])
    return {"a": a, "b": b, "out": out, "cli": result}


def test_the_command_writes_the_table_the_document_and_the_plot(same_direction):
    cli, out = same_direction["cli"], same_direction["out"]
    assert cli.exit_code == 0, cli.output
    assert {p.name for p in out.iterdir()} == {"transfer.json", "transfer.csv", "transfer.png"}
    with open(out / "transfer.csv") as fh:
        table = list(csv.DictReader(fh))
    kinds = {(r["kind"], r["aggregation"]) for r in table}
    assert {("trajectory", "mean"), ("trajectory", "last"), ("token", "lda:tokens"), ("token", "mass_mean:trace_mean"),
            ("chunk", "chunk_end")} <= kinds
    assert len([r for r in table if r["kind"] == "trajectory"]) == 4  # layers 2 and 4 x two aggregations
    for r in table:
        assert float(r["transferred_ci_low"]) <= float(r["transferred_auroc"]) <= float(r["transferred_ci_high"])
    assert table[0]["baseline_length_transferred_auroc"] and table[0]["baseline_random_direction_transferred_auroc"]
    doc = json.loads((out / "transfer.json").read_text())
    assert doc["differences"] == {"dataset": {"train": ["synthetic/seed-1"], "test": ["synthetic/seed-2"]}}
    assert "fit on a.h5 (synthetic/seed-1), the trajectory probe at layer" in cli.output
    assert "keeps AUROC" in cli.output and "on b.h5 (synthetic/seed-2) (in distribution:" in cli.output


def test_a_shared_planted_direction_transfers(same_direction):
    doc = json.loads((same_direction["out"] / "transfer.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 4 + 4 + 2
    for r in rows:  # every probe kind recovers it on the other store's traces
        assert r["transferred"]["ci"][0] > 0.5 and r["transferred"]["value"] > 0.7, r
        assert r["in_distribution"]["ci"][0] > 0.5, r
    fitted = [r for r in rows if r["cosine_train_test"] is not None]
    assert fitted and all(r["cosine_train_test"] > 0.6 for r in fitted)  # the two sides' probes agree
    for r in rows:
        if r["kind"] == "trajectory":  # features that carry nothing of it stay near chance on the test store
            assert r["baselines"]["random_direction"]["value"] < 0.65 and r["baselines"]["length"]["value"] < 0.65
    # the token direction fit on the training store points along the planted one
    u = np.asarray(doc["token"]["directions"]["lda"]["direction"])
    assert abs(float(u @ planted_direction(same_direction["a"])[0])) > 0.9


# direction seeds whose planted directions are nearly orthogonal in 64 dimensions (|cosine| < 0.01): the
# transferred AUROC's truth is then 0.5 within 0.01
UNRELATED = [(1, 4), (2, 17), (3, 7)]


@pytest.mark.parametrize("k", range(len(UNRELATED)))
def test_unrelated_planted_directions_fall_to_chance(tmp_path, k):
    da, db = UNRELATED[k]
    a = probe_store(tmp_path / "a.h5", seed=100 + k, direction_seed=da, d_model=64, **SMALL)
    b = probe_store(tmp_path / "b.h5", seed=200 + k, direction_seed=db, d_model=64, **SMALL)
    assert abs(float(planted_direction(a)[0] @ planted_direction(b)[0])) < 0.01
    result = transfer([a], [b], tmp_path / "out", piece_decoder(SYNTH_MODEL_ID), layers=[2], **FAST)
    rows = result["rows"]
    assert {r["kind"] for r in rows} == {"trajectory", "token", "chunk"}
    for r in rows:
        lo, hi = r["transferred"]["ci"]
        assert lo <= 0.5 <= hi, r
        assert fate(r["transferred"]) == "falls to chance"
    assert any(r["in_distribution"]["ci"][0] > 0.5 for r in rows)  # each store has its own signal
    assert "falls to chance: AUROC" in result["summary"] and "(its CI covers 0.5)" in result["summary"]


def other_model_store(path):
    """Layers, width and dtype as the synthetic stores', another model."""
    with StoreWriter(path, **writer_kwargs(layers=(2, 4), d_model=24)) as w:
        w.append([make_record(i, layers=(2, 4), d_model=24) for i in range(12)])
    return path


@pytest.mark.parametrize("case, words", [
    ("model", "model_id 'tribunal/synthetic' vs 'test/model'"),
    ("layers", "layers [2, 4] vs [2, 6]"),
    ("width", "d_model 24 vs 16"),
    ("dtype", "dtype 'float16' vs 'float32'"),
    ("shared problems", "10 of 10 test problems are also in the training stores (e.g. problem 0 of synthetic/seed-1"),
])
def test_stores_of_another_space_or_the_same_problems_are_refused_in_one_line(same_direction, tmp_path, case, words):
    small = dict(traces=40, problems=10, tokens_per_trace=(20, 30))
    test = {"model": lambda p: other_model_store(p),
            "layers": lambda p: probe_store(p, seed=3, layers=(2, 6), **small),
            "width": lambda p: probe_store(p, seed=3, d_model=16, **small),
            "dtype": lambda p: probe_store(p, seed=3, dtype="float32", **small),
            "shared problems": lambda p: probe_store(p, seed=1, **small)}[case](tmp_path / "test.h5")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["probe", "transfer", "--train", str(same_direction["a"]), "--test", str(test),
                                       "--out", str(out), "--no-chunks"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert words in lines[0], lines[0]
    assert not out.exists()


def test_a_store_given_twice_on_one_side_is_refused(same_direction, tmp_path):
    with pytest.raises(TribunalError, match="given twice"):
        transfer([same_direction["a"], same_direction["a"]], [same_direction["b"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
