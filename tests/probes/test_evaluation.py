"""The cross-validated metrics, their influence terms and the folds, against scikit-learn and by hand."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from tribunal.errors import TribunalError
from tribunal.probes import evaluation as ev


def test_one_class_only():
    with pytest.raises(TribunalError, match="only one class"):
        ev.grouped_folds(np.ones(20, int), np.arange(20) // 2, 5)


def test_folds_keep_problems_whole_and_balance_labels():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 4)
    y = (rng.random(200) < np.repeat(rng.random(50), 4)).astype(int)
    folds = ev.grouped_folds(y, groups, 5, seed=3)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(200))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert abs(y[test].mean() - y.mean()) < 0.1
    assert [t.tolist() for _, t in ev.grouped_folds(y, groups, 5, seed=3)] == [t.tolist() for _, t in folds]


def test_fold_metrics_equal_scikit_learns_fold_by_fold():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    score = np.round(rng.random(120), 2)  # ties included
    groups = np.arange(120) // 3
    folds = ev.grouped_folds(y, groups, 4)
    got = ev.cv_metrics(y, score, folds, groups)
    expect_auc = np.mean([roc_auc_score(y[t], score[t]) for _, t in folds])
    expect_ba = np.mean([balanced_accuracy_score(y[t], score[t] >= 0.5) for _, t in folds])
    assert got["auroc"]["value"] == pytest.approx(expect_auc, abs=1e-12)
    assert got["balanced_accuracy"]["value"] == pytest.approx(expect_ba, abs=1e-12)
    lo, hi = got["auroc"]["ci"]
    assert lo < got["auroc"]["value"] < hi


def test_influence_variance_of_independent_traces_is_the_mann_whitney_variance():
    """With one trace per problem and no ties, the placement-value variance of AUROC under the null averages
    close to the exact Mann-Whitney variance (n0 + n1 + 1) / (12 n0 n1)."""
    rng = np.random.default_rng(5)
    variances = []
    for _ in range(300):
        y = np.r_[np.ones(40, int), np.zeros(60, int)]
        variances.append(ev.heldout_metrics(y, rng.random(100), np.arange(100))["auroc"]["se"] ** 2)
    assert np.mean(variances) == pytest.approx(101 / (12 * 40 * 60), rel=0.1)


def test_a_problem_s_traces_count_once():
    """Copying every trace four times (four samples of each problem, all alike) leaves the interval as wide."""
    rng = np.random.default_rng(1)
    y, score = rng.integers(0, 2, 80), rng.random(80)
    one = ev.heldout_metrics(y, score, np.arange(80))["auroc"]
    four = ev.heldout_metrics(np.repeat(y, 4), np.repeat(score, 4), np.repeat(np.arange(80), 4))["auroc"]
    assert four["value"] == pytest.approx(one["value"]) and four["se"] == pytest.approx(one["se"], rel=0.02)


def test_paired_difference_of_a_score_with_itself_is_zero():
    rng = np.random.default_rng(2)
    y, score, groups = rng.integers(0, 2, 90), rng.random(90), np.arange(90) // 3
    folds = ev.grouped_folds(y, groups, 3)
    same = ev.paired_auroc_difference(y, score, score, folds, groups)
    assert same["value"] == 0 and same["ci"] == [0.0, 0.0]


def test_ratio_interval_by_hand():
    # two problems: (1 + 0) / 2 and (1 + 1) / 2 -> 3 / 4
    m = ev.ratio_interval([1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1])
    assert m["value"] == 0.75 and m["ci"][0] < 0.75 < m["ci"][1]


def test_satterthwaite_df_sums_the_folds_problems_and_follows_the_largest_share():
    """Folds of equal variance: the df of their mean is the folds' problems - 1 summed (5 folds of 8 problems:
    35, where the old lower bound said 7); a fold that holds all the variance gives its own problems - 1; refitting's
    variance brings its own df (permutations - 1)."""
    y = np.tile([0, 1], 40)
    groups = np.repeat(np.arange(40), 2)
    score = np.random.default_rng(0).random(80)
    folds = ev.grouped_folds(y, groups, 5, seed=0)
    mean, variance, term = (v[0] for v in ev.cv_values(y, score, folds, groups)["auroc"])
    equal = variance / 5
    assert ev.satterthwaite_df(5 * equal, 5 * equal ** 2 / 7) == pytest.approx(35)
    assert ev.satterthwaite_df(variance, variance ** 2 / 7) == pytest.approx(7)
    assert 7 <= ev.satterthwaite_df(variance, term) <= 35
    assert ev.satterthwaite_df(1.0, 1.0 / 35, refit=1.0, refit_df=49) == pytest.approx(4 / (1 / 35 + 1 / 49))
    assert ev.cv_interval(ev.cv_values(y, score, folds, groups)["auroc"])["value"] == pytest.approx(mean)
