"""The per-token probe on a synthetic store with a planted direction: recovered within a memory budget."""

import numpy as np
import pytest

from conftest import planted_direction as planted
from conftest import probe_store as synth
from tribunal.errors import TribunalError
from tribunal.report.outputs import token_outputs


def test_token_probe_memory_bound_and_outputs(tmp_path):
    path = synth(tmp_path / "s.h5", traces=200, problems=50, signal=0.85)
    out = token_outputs(path, tmp_path / "out", layer=4, memory="400M")
    lda = out["token"]["directions"]["lda"]
    assert lda["auroc"]["value"] > 0.7 and len(lda["auroc_by_position"]) == 10
    w, _ = planted(path)
    assert abs(np.dot(lda["direction"], w)) > 0.9
    assert (tmp_path / "out" / "token_probe.png").stat().st_size > 0
    with pytest.raises(TribunalError, match="too small"):
        token_outputs(path, tmp_path / "out2", layer=4, memory="64M")
