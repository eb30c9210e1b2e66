"""verify (tribunal/store/verify.py): broken invariants are found and named."""

import h5py
from click.testing import CliRunner

from tribunal.cli import main


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
