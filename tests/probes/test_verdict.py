"""What the report lets a reader claim: a null reads as a null, disagreeing folds are said to disagree,
calibration is judged against constant predictors, and the family-wise p holds its level under the null."""

import numpy as np
import pytest

from tribunal.probes import verdict
from tribunal.report.markdown import write_report
from tribunal.report.outputs import token_outputs, trajectory_outputs
from conftest import synth_store

FAST = dict(permutations=19, progress=False)
GENERATION = {"status": "done", "problems_tried": 60, "problems_in_shard": 60, "traces": 240, "tokens": 17000,
              "labels": {"correct": 120, "incorrect": 120}, "targets_met": True, "seconds": 4.0, "new_tokens": 17000}


def synth(path, **kw):
    return synth_store(path, **{**dict(traces=240, problems=60, layers=(2, 4), d_model=24, tokens_per_trace=(40, 100),
                                       signal=0.8), **kw})


def report_of(tmp_path, store, **options):
    traj = trajectory_outputs(store, tmp_path / "out", aggregations=("mean", "last"), **{**FAST, **options})
    tok = token_outputs(store, tmp_path / "out", layer=4, memory="256M")
    write_report(tmp_path / "report.md", GENERATION, traj, tok, 1.0)
    return traj, (tmp_path / "report.md").read_text()


def test_a_null_store_reads_as_a_null_before_any_number(tmp_path):
    traj, report = report_of(tmp_path, synth(tmp_path / "null.h5", signal=0.5, seed=3))
    assert traj["summary"].splitlines()[0].startswith("No evidence of a signal:")
    first = next(line for line in report.splitlines()[1:] if line.strip())
    assert first.startswith("**No evidence of a signal:"), first
    assert "covers 0.5" in first or "permutation p" in first


def test_a_planted_signal_reads_as_a_signal(tmp_path):
    store = synth(tmp_path / "signal.h5", signal=0.9, traces=400, problems=100)
    traj, report = report_of(tmp_path, store)
    first = next(line for line in report.splitlines()[1:] if line.strip())
    assert first.startswith("**No evidence") and "19 permutations cannot give less" in first, first
    traj, report = report_of(tmp_path, store, permutations=39)
    first = next(line for line in report.splitlines()[1:] if line.strip())
    assert first.startswith("**The residual stream predicts whether a trace is correct"), first
    assert "family-wise permutation p = 0.025" in first  # 39 permutations: the smallest p there is
    sel = traj["result"]["selection"]
    final = sel["final"]
    assert final["layer"] in (2, 4) and "of 5 outer folds chose it" in report  # synth plants the signal in both
    assert "![probe results](probe_results.png)" in report and "reliability diagram" in report
    assert (tmp_path / "out" / "probe_results.png").stat().st_size > 0


def fold_disagreement():
    """The embedded demo's case from the review: five outer folds, five different cells."""
    m = {"value": 0.569, "ci": [0.417, 0.718]}
    return {
        "method": "nested problem-grouped CV", "nested_metrics": {"auroc": m, "balanced_accuracy": m},
        "chosen_per_fold": {"3/max": 1, "6/last_k": 1, "3/last_k": 1, "3/last": 1, "3/mean": 1}, "folds_agree": False,
        "family_wise": {"p": 0.078, "method": "max-statistic"},
        "final": {"layer": 6, "aggregation": "max", "folds_won": 0, "folds": 5, "rule": "the selection refit on all problems"},
    }


def test_disagreeing_folds_are_named_with_their_counts():
    sel = fold_disagreement()
    text = " ".join(verdict.selection_sentences(sel))
    assert "The outer folds disagree: they chose 5 different cells (3/max in 1 of 5" in text
    assert "belongs to the selection procedure, not to any one cell" in text
    assert "The direction cell (the directions file and `tribunal score` use it) is layer 6, `max`: the selection refit on all problems; 0 of 5 outer folds chose it" in text
    assert verdict.headline(sel).startswith("No evidence of a signal")
    sel.update(chosen_per_fold={"4/mean": 5}, folds_agree=True)
    assert verdict.selection_sentences(sel)[0] == "All 5 outer folds chose layer 4, `mean`."


def test_calibration_is_judged_against_constant_predictors():
    from tribunal.probes import evaluation as ev

    y = np.array([1, 0] * 50)
    bad = ev.calibration(y, np.where(y == 1, 0.1, 0.9))  # confidently wrong
    assert "worse than a constant prediction of 0.5" in ev.calibration_verdict(bad)
    assert bad["reference"]["brier_constant_half"] == 0.25 and bad["reference"]["brier_constant_base_rate"] == 0.25
    good = ev.calibration(y, np.where(y == 1, 0.8, 0.2))
    assert "better than always predicting the base rate" in ev.calibration_verdict(good)


@pytest.mark.slow
def test_family_wise_p_holds_its_level_under_the_null(tmp_path):
    """Ten null stores, four cells each: the family-wise p of the best cell is roughly uniform, while the best
    cell's uncorrected p is not (the search makes it look significant more often)."""
    from tribunal.probes.run import probe_trajectory

    family, uncorrected = [], []
    for seed in range(10):
        store = synth(tmp_path / f"n{seed}.h5", signal=0.5, seed=100 + seed, traces=160, problems=40)
        result = probe_trajectory(store, tmp_path / f"o{seed}", aggregations=("mean", "last"),
                                  permutations=19, progress=False)["result"]
        family.append(result["selection"]["family_wise"]["p"])
        uncorrected.append(min(c["permutation_p"] for c in result["cells"]))
    family, uncorrected = np.array(family), np.array(uncorrected)
    assert np.mean(family < 0.05) <= 0.2, family  # about 5% expected; 2 of 10 allowed by chance
    assert 0.25 <= family.mean() <= 0.75, family  # a uniform's mean is 0.5
    assert uncorrected.mean() < family.mean(), (uncorrected, family)


def _rule(saved, change, change_lo, saved_lo=None):
    return {"tokens_saved": saved, "tokens_saved_ci": [saved - 0.05 if saved_lo is None else saved_lo, saved + 0.05],
            "accuracy_change": change, "accuracy_change_ci": [change_lo, change + 0.02]}


@pytest.mark.parametrize("probe, trial, needle", [
    (_rule(0.35, 0.0, -0.01), _rule(0.10, 0.0, -0.01), "The probe saves more tokens than DEER's"),
    (_rule(0.35, 0.0, -0.01), _rule(0.50, 0.0, -0.01), "The probe does not beat DEER's"),
    (_rule(0.35, 0.0, -0.06), _rule(0.00, 0.0, 0.0), "not shown to beat DEER's trial-answer confidence: the probe "
                                                     "rule may lose more accuracy than the margin 0.02 allows"),
    (_rule(0.35, 0.0, -0.01, saved_lo=-0.01), _rule(0.0, 0.0, 0.0), "token saving is not distinguishable from none"),
])
def test_the_verdict_against_deer_says_which_side_wins_or_that_neither_is_shown(probe, trial, needle):
    exit_ = {"margin": 0.02, "rules": {"probe": probe, "trial_answer": trial, "confidence": _rule(0.0, 0.0, 0.0)}}
    said = verdict.early_exit(exit_, signal=True)["versus_trial_answer"]
    assert needle in said, said
    assert "not shown" in verdict.early_exit(exit_, signal=False)["versus_trial_answer"]
