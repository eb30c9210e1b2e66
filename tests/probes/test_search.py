"""The batched probe fit equals scikit-learn's, below and above as many dimensions as training traces."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tribunal.probes import evaluation as ev
from tribunal.probes.search import FoldFeatures


@pytest.mark.parametrize("dim", [8, 300])
def test_out_of_fold_probabilities_equal_scikit_learns(dim):
    rng = np.random.default_rng(dim)
    groups = np.repeat(np.arange(40), 3)
    X = rng.normal(size=(40, dim))[groups] + rng.normal(size=(120, dim))
    y = (X[:, 0] + rng.normal(size=120) > 0).astype(int)
    folds = ev.grouped_folds(y, groups, 4)
    expected = np.zeros(120)
    for train, test in folds:
        model = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=10000)).fit(X[train], y[train])
        expected[test] = model.predict_proba(X[test])[:, 1]
    fits = FoldFeatures(X, folds)
    np.testing.assert_allclose(fits.fit_out_of_fold(y), expected, atol=1e-4)
    permuted = np.column_stack([y, rng.permutation(y)])
    np.testing.assert_allclose(fits.fit_out_of_fold(permuted)[:, 0], expected, atol=1e-4)  # batched: the same fit


def test_an_undefined_roc_auc_never_wins_the_selection():
    from tribunal.probes.search import _best

    assert _best([0.6, float("nan"), 0.7, 0.7]) == 2  # NaN compares false both ways: max() could have kept it
    assert _best([float("nan"), 0.55]) == 1 and _best([float("nan"), float("nan")]) == 0
