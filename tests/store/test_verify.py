"""verify (tribunal/store/verify.py): broken invariants are found and named."""

import h5py
import pytest
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.store import StoreWriter, open_store
from tribunal.store.verify import verify_store

from .monitored import monitored_kwargs, monitored_record


def test_verify_reports_broken_invariants(good_store):
    with h5py.File(good_store, "r+") as f:
        table = f["traces/table"]
        row = table[2]
        row["token_start"] += 1
        table[2] = row
        acts = f["activations/layer_002"]
        acts[3, 0] = float("nan")
    result = CliRunner().invoke(main, ["verify", str(good_store)])
    assert result.exit_code == 1
    assert "not contiguous" in result.output and "NaN/Inf" in result.output



def _set_exit(f, **values):
    rows = f["traces/exit"][:]
    for key, value in values.items():
        rows[0][key] = value
    f["traces/exit"][:] = rows


@pytest.mark.parametrize("damage,needle", [
    (lambda f: f["monitor/token_score"].__setitem__(0, 1.0), "/monitor/token_score has values on 1 prompt tokens"),
    (lambda f: f["monitor/chunk_probability"].__setitem__(10, 1.5), "/monitor/chunk_probability has 1 values outside"),
    (lambda f: _set_exit(f, exit_chunk=2), "trace 0's exit record has rule 'none' with exit_chunk 2"),
    (lambda f: _set_exit(f, rule=1), "trace 0's exit record has rule 'probe' with exit_chunk -1"),
    (lambda f: _set_exit(f, forced_tokens=-2, thinking_tokens=0), "negative token counts"),
    (lambda f: _set_exit(f, thinking_tokens=3), "but the trace has"),
])
def test_verify_checks_monitor_scores_and_exit_records(tmp_path, damage, needle):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **monitored_kwargs()) as w:
        w.append([monitored_record(i) for i in range(4)])
    with open_store(path) as store:
        assert verify_store(store) == []
    with h5py.File(path, "r+") as f:
        damage(f)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and needle in result.output, result.output
