"""The per-token probe on a synthetic store with a planted direction: recovered within a memory budget."""

import json

import numpy as np
import pytest

from conftest import synth_store
from tribunal.errors import TribunalError
from tribunal.report.outputs import token_outputs
from tribunal.store import open_store


def synth(path, **kw):
    return synth_store(path, **{**dict(traces=400, problems=100, layers=(2, 4), d_model=24, tokens_per_trace=(40, 120),
                                       signal=0.8), **kw})


def planted(path):
    with open_store(path) as store:
        return store.shards[0].file["synth/direction"][:], json.loads(store.attrs["synth"]) if isinstance(
            store.attrs["synth"], str) else store.attrs["synth"]


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
