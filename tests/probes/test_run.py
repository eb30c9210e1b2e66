"""probes/run.py: seeds reach the probes, output folders appear only with their numbers, chunk_metrics.json names
what each figure measures."""

import json

import pytest

from conftest import synth_store
from tribunal.errors import TribunalError
from tribunal.probes.run import probe_chunks, probe_tokens, probe_trajectory
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


def test_chunk_metrics_name_nested_and_direction_cell_figures(tmp_path):
    store = synth_store(tmp_path / "c.h5", traces=80, problems=20, layers=(2, 4), d_model=16, chunk_signal=0.8)
    done = probe_chunks(store, tmp_path / "out", piece_decoder("tribunal/synthetic"), permutations=5, folds=3,
                        progress=False)
    metrics = json.loads((tmp_path / "out" / "chunk_metrics.json").read_text())
    sel = done["result"]["selection"]
    assert metrics["nested"]["auroc"] == sel["nested_metrics"]["auroc"]["value"]
    assert metrics["nested"]["folds_chose"] == sel["chosen_per_fold"]
    cell = metrics["direction_cell"]
    layer = next(c for c in done["result"]["layers"] if c["layer"] == cell["layer"])
    assert cell["layer"] == sel["final"]["layer"] == done["document"]["chunk"]["direction"]["layer"]
    assert cell["auroc"] == layer["metrics"]["auroc"]["value"] and "optimistic" in cell["note"]
    assert "layer" not in metrics and "auroc" not in metrics  # no unlabelled figure beside the others
