"""tribunal's estimator, intervals and permutation null on simulated feature matrices of a known truth
(tribunal/probes/simulation.py): problems with a difficulty shared by their samples, features with
problem-level random effects. Fixed seeds; docs/probes.md gives the same figures and how to rerun them."""

import json

import pytest

from tribunal.probes import simulation as sim

# (shape, data sets, seed, highest coverage allowed). The second shape has more dimensions than training
# traces, as real runs do, and folds of 8 problems: with the smallest fold's problems - 1 (7) as the cells'
# df its CIs covered 0.5 in 97.25% of cells; Welch-Satterthwaite's df (about 35) gives 93.5%, the nested
# figure (which keeps the lower bound) 95.5%.
NULL_CASES = [(sim.Shape(problems=60, samples=4, dim=64), 400, 5000, 0.97),
              (sim.Shape(problems=40, samples=2, dim=512), 200, 0, 0.97)]


@pytest.mark.parametrize("shape, sets, seed, highest", NULL_CASES, ids=["60x4_d64", "40x2_d512"])
def test_null_estimates_centre_on_chance_and_intervals_cover_it(shape, sets, seed, highest):
    out = sim.study(shape, auroc=0.5, sets=sets, seed=seed)
    print(json.dumps(out))  # the figures docs/probes.md quotes (pytest -rP shows them)
    for figure in (out["cells"], out["nested"]):
        assert abs(figure["mean_auroc"] - 0.5) <= 0.01, out
        assert 0.93 <= figure["coverage"] <= highest, out
    assert 0.02 <= out["cells"]["p_below_0.05"] <= 0.08, out
    assert 0.02 <= out["family_wise_p_below_0.05"] <= 0.08, out


@pytest.mark.parametrize("auroc", [0.7, 0.85])
def test_a_planted_signal_is_covered(auroc):
    """Cross-validation estimates the AUROC of the probe as fit on 4/5 of the problems, below the planted (ideal)
    one by what fitting d dimensions loses: at 100 x 4 and d 8 that loss is small, and the CI covers both."""
    out = sim.study(sim.Shape(problems=100, samples=4, dim=8, cells=1), auroc=auroc, sets=100, seed=2000)
    print(json.dumps(out))
    assert out["cells"]["coverage"] >= 0.9 and out["nested"]["coverage"] >= 0.9, out
    assert out["cells"]["coverage_of_fitted"] >= 0.9, out
    assert out["cells"]["p_below_0.05"] >= 0.9, out  # and the permutation test sees it


def test_a_null_chunk_signal_claims_no_early_exit():
    out = sim.chunk_study(sim.Shape(problems=40, samples=3, dim=32), sets=60, seed=3000)
    print(json.dumps(out))
    assert out["early_exit_claims"] <= 0.05, out
    assert out["nested_coverage"] >= 0.9 and abs(out["mean_nested_auroc"] - 0.5) <= 0.02, out


@pytest.mark.parametrize("chunk_auroc", [0.5, 0.85], ids=["null", "planted_0.85"])
def test_early_exit_intervals_cover_the_value_of_the_chosen_settings(chunk_auroc):
    """Each rule's accuracy, accuracy change and tokens saved CI against the truth it estimates: the thresholds
    (or fractions) the outer folds chose, applied to 4,000 fresh problems scored by each fold's own probe. With
    a planted chunk signal the probe's rule exits early, so coverage is measured where it saves tokens."""
    out = sim.chunk_study(sim.Shape(problems=40, samples=3, dim=32), sets=100, seed=6000, chunk_auroc=chunk_auroc)
    print(json.dumps(out))
    for rule, figures in out["early_exit"].items():
        for figure in sim.EXIT_FIGURES:
            assert figures[figure]["coverage"] >= 0.9, (rule, figure, out)
    assert out["early_exit"]["probe"]["exits_early"] >= 0.9, out
