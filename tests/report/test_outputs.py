"""The probes' outputs and their figures, written together on a real synthetic store: every figure a run writes is
a page-wide grid (no long row of panels)."""

import matplotlib.image
import pytest

from conftest import synth_store
from tribunal.report.outputs import (CHUNK_FIGURE, EXIT_FIGURE, TOKEN_FIGURE, TRAJECTORY_FIGURE, chunk_outputs,
                                     token_outputs, trajectory_outputs)
from tribunal.traces.models import piece_decoder

FAST = dict(permutations=9, memory="256M", progress=False)
FIGURES = (TRAJECTORY_FIGURE, TOKEN_FIGURE, CHUNK_FIGURE, EXIT_FIGURE)
_RUNS = {}


def probe_run(tmp_path_factory) -> dict:
    """All three probes on a small synthetic store with a planted trace and chunk signal, their figures drawn into
    one folder; run once a session (the report's and the figures' tests share it: copy before changing it)."""
    if "run" not in _RUNS:
        _RUNS["run"] = _probe_all(tmp_path_factory.mktemp("probe-run"))
    return _RUNS["run"]


def _probe_all(out) -> dict:
    store = synth_store(out / "synth.h5", traces=80, problems=20, layers=(2, 4), d_model=8,
                        tokens_per_trace=(30, 60), signal=0.8, chunk_signal=0.8)
    traj = trajectory_outputs(store, out, **FAST)
    tok = token_outputs(store, out, layer=traj["result"]["selection"]["final"]["layer"], memory="256M",
                        progress=False)
    chunks = chunk_outputs(store, out, piece_decoder("tribunal/synthetic"), **FAST)
    return {"out": out, "store": store, "traj": traj, "tok": tok, "chunks": chunks}


@pytest.fixture
def run(tmp_path_factory):
    return probe_run(tmp_path_factory)


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_fits_a_page(run, name):
    height, width = matplotlib.image.imread(run["out"] / name).shape[:2]
    assert width <= 1200, (name, width)  # two panels a row at most: readable at page width
    assert width / height <= 2.5, (name, width, height)  # a grid or a single panel, not a row of seven
