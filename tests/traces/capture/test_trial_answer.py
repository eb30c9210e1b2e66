"""DEER's trial answers on a store the embedded model wrote: forced at each chunk end, graded, batched as one at a time,
and the `probe chunks --model` rule they feed."""

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.errors import TribunalError
from tribunal.grading import answers_match
from tribunal.probes.chunk_probe import load_chunks
from tribunal.store import open_store
from tribunal.traces.capture.trial_answer import _closed_box, store_trial_answers, trial_answers
from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.models import EMBEDDED_MODEL, load_model, piece_decoder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("deer") / "s.h5"
    run_generation(GenerateConfig(out=str(path), keep_all=True, max_problems=12, samples_per_problem=2, progress=False))
    return path


@pytest.fixture(scope="module")
def embedded():
    return load_model(None)


@pytest.fixture(scope="module")
def rows(store):
    with open_store(store) as opened:
        return load_chunks(opened, piece_decoder(opened.model_id))


@pytest.fixture(scope="module")
def trial(store, embedded, rows):
    with open_store(store) as opened:
        return trial_answers(opened, *embedded, rows.trace, rows.token_end)


def test_trial_answers_are_confidences_and_graded_answers(store, trial, rows):
    assert len(trial["confidence"]) == len(trial["answer"]) == len(trial["correct"]) == len(rows.trace) > 20
    assert np.all((trial["confidence"] > 0) & (trial["confidence"] <= 1))
    answered = [a for a in trial["answer"] if a is not None]
    assert len(answered) >= 0.9 * len(rows.trace) and all(a.lstrip("-").isdigit() for a in answered)
    with open_store(store) as opened:
        golds = [opened.trace(int(i)).gold for i in rows.trace]
    assert trial["correct"].tolist() == [answers_match(a, g) for a, g in zip(trial["answer"], golds)]
    assert 0 < trial["correct"].mean() < 1  # forced early, some trial answers are wrong; some are right


def test_a_forced_answer_at_a_chunk_end_is_mostly_that_chunks_answer(trial, rows):
    """The embedded model ends its thinking with ANSWER_CUE + "N}.": forced right after a chunk that states N, it
    mostly writes N."""
    same = [a is not None and answers_match(a, b) for a, b in zip(trial["answer"], rows.answer)]
    assert np.mean(same) >= 0.7, list(zip(trial["answer"], rows.answer))


def test_batched_equals_one_at_a_time(store, embedded, trial, rows):
    """Left padding and the KV cache change nothing: rows of many lengths, batched by 16 above, one at a time here."""
    some = np.arange(0, len(rows.trace), 7)[:10]
    assert len(np.unique(rows.token_end[some])) > 3
    with open_store(store) as opened:
        single = trial_answers(opened, *embedded, rows.trace[some], rows.token_end[some], batch_size=1)
    np.testing.assert_allclose(single["confidence"], trial["confidence"][some], rtol=0, atol=1e-5)
    assert single["answer"] == [trial["answer"][j] for j in some]
    assert single["correct"].tolist() == trial["correct"][some].tolist()


def test_the_box_closes_at_its_own_brace():
    assert _closed_box("\\frac{1}{2}}. More") == "\\frac{1}{2}" and _closed_box("12}") == "12"
    assert _closed_box("\\frac{1}{2") is None and _closed_box("") is None


def test_bad_rows_and_a_model_that_did_not_write_the_store(store, embedded, rows, tiny_model, tmp_path):
    with open_store(store) as opened:
        with pytest.raises(TribunalError, match="no chunk ends at token"):
            trial_answers(opened, *embedded, [0], [10_000])
        with pytest.raises(TribunalError, match="1 trace indices but 2 chunk ends"):
            trial_answers(opened, *embedded, [0], [1, 2])
        other = tmp_path / "other"
        shutil.copytree(tiny_model, other)
        doc = json.loads((other / "tokenizer.json").read_text())
        vocab = doc["model"]["vocab"]
        top = max(vocab.values())
        doc["model"]["vocab"] = {t: i if i < 3 else top + 3 - i for t, i in vocab.items()}  # same pieces, other ids
        (other / "tokenizer.json").write_text(json.dumps(doc))
        with pytest.raises(TribunalError, match="does not spell the store's traces"):
            store_trial_answers(opened, str(other), rows.trace[:1], rows.token_end[:1])


def test_probe_chunks_with_model_adds_the_trial_answer_rule(store, tmp_path):
    out = tmp_path / "probes"
    r = CliRunner().invoke(main, ["probe", "chunks", str(store), "--out", str(out), "--model", str(EMBEDDED_MODEL),
                                  "--folds", "3", "--permutations", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "chunk_metrics.json").read_text())
    assert "trial_answer" in metrics["early_exit"]["baselines"], metrics["early_exit"]
    with open(out / "chunks.csv") as fh:
        assert "trial_answer" in next(csv.reader(fh))
    plain = tmp_path / "plain"
    r = CliRunner().invoke(main, ["probe", "chunks", str(store), "--out", str(plain), "--folds", "3",
                                  "--permutations", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "trial_answer" not in json.loads((plain / "chunk_metrics.json").read_text())["early_exit"]["baselines"]
