"""tribunal's estimator, intervals and permutation null on simulated feature matrices of a known truth
(tribunal/probes/simulation.py): problems with a difficulty shared by their samples, features with
problem-level random effects. Fixed seeds; docs/probes.md gives the same figures and how to rerun them."""

import pytest

from tribunal.probes import simulation as sim

NULL_SHAPES = [sim.Shape(problems=60, samples=4, dim=64), sim.Shape(problems=40, samples=2, dim=512)]


@pytest.mark.parametrize("shape", NULL_SHAPES, ids=["60x4_d64", "40x2_d512"])
def test_null_estimates_centre_on_chance_and_intervals_cover_it(shape):
    out = sim.study(shape, auroc=0.5, sets=200, seed=1000)
    for figure in (out["cells"], out["nested"]):
        assert abs(figure["mean_auroc"] - 0.5) <= 0.01, out
        assert 0.93 <= figure["coverage"] <= 0.97, out
    assert 0.02 <= out["cells"]["p_below_0.05"] <= 0.08, out
    assert 0.02 <= out["family_wise_p_below_0.05"] <= 0.08, out


@pytest.mark.parametrize("auroc", [0.7, 0.85])
def test_a_planted_signal_is_covered(auroc):
    out = sim.study(sim.Shape(problems=60, samples=4, dim=16, cells=1), auroc=auroc, sets=100, seed=2000)
    assert out["cells"]["coverage"] >= 0.9 and out["nested"]["coverage"] >= 0.9, out
    assert out["cells"]["p_below_0.05"] >= 0.8, out  # and the permutation test sees it


def test_a_null_chunk_signal_claims_no_early_exit():
    out = sim.chunk_study(sim.Shape(problems=40, samples=3, dim=32), sets=60, seed=3000)
    assert out["early_exit_claims"] <= 0.05, out
    assert out["nested_coverage"] >= 0.9 and abs(out["mean_nested_auroc"] - 0.5) <= 0.02, out
