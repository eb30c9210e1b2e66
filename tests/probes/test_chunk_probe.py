"""Chunk probes on synthetic stores with a planted chunk-level truth, through the library and the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synth_store
from tribunal.cli import main
from tribunal.probes.run import probe_chunks
from tribunal.store import open_store
from tribunal.traces.models import piece_decoder

FAST = dict(permutations=19, progress=False)


def chunk_store(path, **kw):
    return synth_store(path, **{**dict(traces=300, problems=100, layers=(2, 4), d_model=24, chunk_signal=0.85), **kw})


def run(path, out):
    return probe_chunks(path, out, piece_decoder("tribunal/synthetic"), **FAST)


def test_planted_chunk_signal_is_recovered(tmp_path):
    path = chunk_store(tmp_path / "s.h5")
    result = run(path, tmp_path / "out")["result"]
    lo, hi = result["selection"]["nested_metrics"]["auroc"]["ci"]
    assert lo - 0.03 <= 0.85 <= hi + 0.03, (lo, hi)  # the planted AUROC, within the CI (and sampling slack)
    with open_store(path) as store:
        w = store.shards[0].file["synth/direction"][:]
    best = max(result["layers"], key=lambda c: c["metrics"]["auroc"]["value"])
    assert abs(np.dot(best["direction"], w)) > 0.9
    assert result["beats"]["position"] and result["beats"]["tokens_so_far"] and result["beats"]["confidence"]


def test_no_chunk_signal_covers_chance(tmp_path):
    path = chunk_store(tmp_path / "null.h5", chunk_signal=0.5)
    done = run(path, tmp_path / "out")
    auroc = done["result"]["selection"]["nested_metrics"]["auroc"]
    assert auroc["ci"][0] <= 0.5 <= auroc["ci"][1], auroc
    assert done["summary"].startswith("No evidence of a signal")


def test_a_position_only_confound_is_caught_by_the_position_baseline(tmp_path):
    path = chunk_store(tmp_path / "pos.h5", chunk_signal=0.5, chunk_position_confound=1.0)
    done = run(path, tmp_path / "out")
    result = done["result"]
    assert result["baselines"]["position"]["auroc"]["value"] > 0.6
    assert not result["beats"]["position"]
    assert "does NOT beat the position baseline" in done["summary"]


def test_cli_outputs(tmp_path):
    path = chunk_store(tmp_path / "s.h5", traces=120, problems=40)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["probe", "chunks", str(path), "--out", str(out), "--quiet",
                                  "--permutations", "9"])
    assert r.exit_code == 0, r.output
    for name in ("chunks.csv", "chunk_metrics.json", "chunk_probe.png", "early_exit.png",
                 "implicit_value_directions.json", "exit_calibration.csv"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "chunk_metrics.json").read_text())
    assert {"auroc", "auroc_ci", "family_wise_p"} <= set(metrics["nested"]) and "layer" in metrics["direction_cell"]
    assert {"accuracy", "full_accuracy", "tokens_saved", "tokens_saved_ci"} <= set(metrics["early_exit"])
    header = (out / "chunks.csv").read_text().splitlines()[0]
    assert header == "trace,problem_id,chunk,token_start,token_end,answer,label,oof_probability"
    doc = json.loads((out / "implicit_value_directions.json").read_text())
    assert len(doc["chunk"]["direction"]["direction"]) == 24 and "early_exit" in doc["chunk"]


def test_synth_chunk_signal_is_validated(tmp_path):
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "x.h5"), "--chunk-signal", "1.5", "--quiet"])
    assert r.exit_code == 1 and "--chunk-signal is an AUROC" in r.output


def test_score_chunk_ends_with_the_chunk_direction(tmp_path):
    """The online monitor reproduces the probe: scoring the same store with the saved chunk direction gives logits
    whose ranking matches the labels as well as the fitted probe does on its own training data."""
    import csv

    from tribunal.probes.evaluation import auroc

    path = chunk_store(tmp_path / "s.h5", traces=120, problems=40)
    out = tmp_path / "out"
    run(path, out)
    r = CliRunner().invoke(main, ["score", str(out), str(path), "--chunks", "--out", str(tmp_path / "c.csv")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert len(rows) == len((out / "chunks.csv").read_text().splitlines()) - 1
    y = [row["label"] == "correct" for row in rows]
    assert auroc(y, [float(row["logit"]) for row in rows]) > 0.8
    r = CliRunner().invoke(main, ["score", str(tmp_path / "nowhere"), str(path), "--chunks", "--out", "x.csv"])
    assert r.exit_code == 1


def test_the_trial_answer_rule_follows_its_score(tmp_path):
    """DEER's rule, on the probes side: a trial-answer score equal to the chunk's correctness exits only at right
    answers (it never loses accuracy, and saves tokens); its opposite exits only at wrong ones, so the threshold
    chosen on all traces and on every fold is never to exit. The verdict says whether the probe beats it."""
    from tribunal.probes.chunk_probe import load_chunks
    from tribunal.report.markdown import early_exit_section
    from tribunal.report.outputs import chunk_outputs

    path = chunk_store(tmp_path / "s.h5", traces=120, problems=40)
    decode = piece_decoder("tribunal/synthetic")
    with open_store(path) as store:
        y = load_chunks(store, decode).y
    done = chunk_outputs(path, tmp_path / "oracle", decode, trial_answer=y.astype(float), **FAST)
    exit_ = done["result"]["early_exit"]
    oracle = exit_["rules"]["trial_answer"]
    assert oracle["accuracy_change"] >= 0 and oracle["tokens_saved"] > 0.2
    said = (("The probe saves more tokens than DEER's",) if exit_["probe_beats"]["trial_answer"]
            else ("The probe is not shown to beat DEER's", "The probe does not beat DEER's"))
    assert any(s in done["summary"] for s in said), done["summary"]
    assert (tmp_path / "oracle" / "early_exit.png").stat().st_size > 0  # the report draws the new rule
    assert any(line.startswith("| trial answer |") for line in early_exit_section(exit_))
    exit_ = probe_chunks(path, tmp_path / "anti", decode, trial_answer=1.0 - y, **FAST)["result"]["early_exit"]
    assert exit_["exit_thresholds"]["trial_answer"] is None and exit_["rules"]["trial_answer"]["tokens_saved"] == 0
    assert exit_["exit_thresholds_how"]["trial_answer"]["per_fold"] == [None] * 5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_scattered_rows_equal_the_stored_rows(tmp_path, dtype):
    """The chunk pass reads only the chunk-end rows, through the chunk index; they equal what HDF5 returns."""
    path = chunk_store(tmp_path / "s.h5", traces=40, problems=10, dtype=dtype)
    with open_store(path) as store:
        shard = store.shards[0]
        rows = np.unique(np.random.default_rng(0).integers(0, store.n_tokens, 50))
        direct = shard.file["activations/layer_004"][rows]
        np.testing.assert_array_equal(shard.read_scattered(4, rows), direct)
