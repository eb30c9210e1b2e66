"""probes/run.py: seeds reach the probes, output folders appear only with their numbers, chunk_metrics.json names
what each figure measures."""

import csv
import json
import math

import numpy as np
import pytest

from conftest import synth_store
from tribunal.errors import TribunalError
from tribunal.probes import early_exit as ee
from tribunal.probes import exit_policy as xp
from tribunal.probes.chunk_probe import load_chunks
from tribunal.probes.run import probe_chunks, probe_tokens, probe_trajectory
from tribunal.store import open_store
from tribunal.traces.models import piece_decoder

FAST = dict(aggregations="mean,last", permutations=9, folds=3, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synth_store(tmp_path_factory.mktemp("s") / "s.h5", traces=120, problems=30, layers=(2, 4), d_model=16,
                       tokens_per_trace=(20, 40), signal=0.7)


def test_one_seed_gives_the_same_numbers_and_two_seeds_two_null_draws(store, tmp_path):
    runs = {name: probe_trajectory(store, tmp_path / name, seed=seed, **FAST) for name, seed in
            (("a", 1), ("b", 1), ("c", 2))}
    csv = {name: (tmp_path / name / "metrics.csv").read_text() for name in runs}
    assert csv["a"] == csv["b"]
    assert csv["a"] != csv["c"]

    def null(name):  # what each cell's permutation null gave: its p-value and the refitting variance it measured
        return [(c["permutation_p"], json.dumps(c["refit_variance"], sort_keys=True)) for c in runs[name]["result"]["cells"]]

    assert null("a") == null("b") and null("a") != null("c")
    assert runs["c"]["document"]["settings"]["seed"] == 2


@pytest.mark.parametrize("bad, message", [
    ({"layers": [9]}, "not in the store"), ({"folds": 1}, "--folds"), ({"aggregations": "mean,median"}, "--aggregations"),
])
def test_bad_trajectory_input_leaves_no_folder(store, tmp_path, bad, message):
    with pytest.raises(TribunalError, match=message):
        probe_trajectory(store, tmp_path / "new" / "out", **{**FAST, **bad})
    assert not (tmp_path / "new").exists()


def test_a_missing_store_leaves_no_folder(tmp_path):
    for probe in (probe_trajectory, probe_tokens):
        with pytest.raises(TribunalError, match="does not exist"):
            probe(tmp_path / "missing.h5", tmp_path / "out", progress=False)
    with pytest.raises(TribunalError, match="does not exist"):
        probe_chunks(tmp_path / "missing.h5", tmp_path / "out", piece_decoder("tribunal/synthetic"), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_token_input_leaves_no_folder(store, tmp_path):
    with pytest.raises(TribunalError, match="not in the store"):
        probe_tokens(store, tmp_path / "out", layer=9, progress=False)
    with pytest.raises(TribunalError, match="--test-fraction"):
        probe_tokens(store, tmp_path / "out", test_fraction=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_token_probe_records_its_options(store, tmp_path):
    done = probe_tokens(store, tmp_path / "out", layer=4, memory="400M", seed=3, progress=False)
    settings = done["document"]["settings"]
    assert settings["token_layer"] == 4 and settings["token_seed"] == 3 and settings["token_memory"] == "400M"


CHUNKS = dict(permutations=5, folds=3, progress=False)


@pytest.fixture(scope="module")
def chunk_runs(tmp_path_factory):
    """The same chunk store probed without and with a trial-answer score (informative, noisy)."""
    root = tmp_path_factory.mktemp("c")
    store = synth_store(root / "c.h5", traces=80, problems=20, layers=(2, 4), d_model=16, chunk_signal=0.8)
    decode = piece_decoder("tribunal/synthetic")
    with open_store(store) as s:
        y = load_chunks(s, decode).y
    trial = 0.5 * y + 0.5 * np.random.default_rng(0).random(len(y))
    plain = probe_chunks(store, root / "plain", decode, **CHUNKS)
    deer = probe_chunks(store, root / "deer", decode, trial_answer=trial, trial_answer_correct=y, **CHUNKS)
    return {"store": store, "decode": decode, "plain": (plain, root / "plain"), "deer": (deer, root / "deer"),
            "trial": trial}


def test_chunk_metrics_name_nested_and_direction_cell_figures(chunk_runs):
    done, out = chunk_runs["plain"]
    metrics = json.loads((out / "chunk_metrics.json").read_text())
    sel = done["result"]["selection"]
    assert metrics["nested"]["auroc"] == sel["nested_metrics"]["auroc"]["value"]
    assert metrics["nested"]["folds_chose"] == sel["chosen_per_fold"]
    cell = metrics["direction_cell"]
    layer = next(c for c in done["result"]["layers"] if c["layer"] == cell["layer"])
    assert cell["layer"] == sel["final"]["layer"] == done["document"]["chunk"]["direction"]["layer"]
    assert cell["auroc"] == layer["metrics"]["auroc"]["value"] and "optimistic" in cell["note"]
    assert "layer" not in metrics and "auroc" not in metrics  # no unlabelled figure beside the others


def test_auto_thresholds_and_calibration_data_are_written(chunk_runs):
    """exit_thresholds: choose_threshold on ALL traces' out-of-fold scores, which exit_calibration.csv holds."""
    done, out = chunk_runs["plain"]
    chunk, exit_ = done["document"]["chunk"], done["result"]["early_exit"]
    assert set(chunk["exit_thresholds"]) == {"probe", "confidence"} == set(chunk["exit_thresholds_how"])
    saved = json.loads((out / xp.DIRECTIONS_FILE).read_text())["chunk"]
    assert saved["exit_thresholds"] == chunk["exit_thresholds"]
    from tribunal.chunks import DEFAULT_CUES

    assert saved["chunking"] == {"cues": list(DEFAULT_CUES), "extra": None}  # what the live monitor chunks with
    lines = (out / xp.CALIBRATION_FILE).read_text().splitlines()
    assert lines[0] == ",".join(xp.COLUMNS)
    rows = list(csv.DictReader(open(out / "chunks.csv")))
    calibration = [r for r in csv.DictReader(open(out / xp.CALIBRATION_FILE)) if r["chunk"] != "-1"]
    assert len(calibration) == len(rows) == done["result"]["chunks"]
    assert all(abs(float(c["probe"]) - float(r["oof_probability"])) < 1e-4 for c, r in zip(calibration, rows))
    case, scores, _ = xp.read_calibration(out / xp.CALIBRATION_FILE)
    assert len(case.trace_correct) == done["result"]["early_exit"]["traces"]
    for rule, tau in chunk["exit_thresholds"].items():
        expected = ee.choose_threshold(case, scores[rule], exit_["margin"])
        assert (tau is None and math.isinf(expected)) or tau == expected, rule
        how = chunk["exit_thresholds_how"][rule]
        assert "all 80 traces" in how["rule"] and len(how["per_fold"]) == 3
        assert xp.resolve_threshold("auto", out, rule)[0] == (math.inf if tau is None else tau)
    assert "auto exit thresholds" in done["summary"]


def test_the_trial_answer_rule_appears_when_given_and_not_otherwise(chunk_runs):
    plain, deer = chunk_runs["plain"][0], chunk_runs["deer"][0]
    for done, given in ((plain, False), (deer, True)):
        exit_ = done["result"]["early_exit"]
        assert all(("trial_answer" in part) == given for part in (exit_["rules"], exit_["curves"],
                                                                  exit_["exit_thresholds"], exit_["probe_beats"]))
        assert ("DEER's trial-answer confidence" in done["summary"]) == given
        assert ("trial answer" in exit_["verdict"]) == given
    out = chunk_runs["deer"][1]
    assert (out / "chunks.csv").read_text().splitlines()[0].endswith(",oof_probability,trial_answer")
    assert (out / xp.CALIBRATION_FILE).read_text().splitlines()[0] == ",".join(
        xp.COLUMNS + ("trial_answer", "trial_answer_correct"))
    _, scores, extra = xp.read_calibration(out / xp.CALIBRATION_FILE)
    np.testing.assert_allclose(scores["trial_answer"], chunk_runs["trial"], rtol=1e-5)
    assert "trial_answer_correct" in extra
    # the probe's own figures do not move when a baseline is added
    assert plain["result"]["early_exit"]["rules"]["probe"] == deer["result"]["early_exit"]["rules"]["probe"]


def test_a_trial_answer_of_the_wrong_length_leaves_no_folder(chunk_runs, tmp_path):
    with pytest.raises(TribunalError, match="trial_answer has 3 values but the store has"):
        probe_chunks(chunk_runs["store"], tmp_path / "out", chunk_runs["decode"], trial_answer=[0.1, 0.2, 0.3],
                     **CHUNKS)
    assert not (tmp_path / "out").exists()
