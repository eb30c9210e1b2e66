"""The superblock repair and truncation check (tribunal/store/superblock.py)."""

import h5py
import pytest
from click.testing import CliRunner

from conftest import make_record, writer_kwargs
from tribunal.cli import main
from tribunal.errors import StoreError
from tribunal.store import StoreWriter
from tribunal.store.superblock import read_status

from .killed_writers import check_store, crash_record, crash_writer_kwargs, run_writer, wait_for_commit


def test_killed_writer_leaves_flags_that_plain_hdf5_refuses_and_we_repair(tmp_path, python_env):
    """The known trap: a plain reopen fails after kill -9; our open-for-append clears it."""
    path = tmp_path / "trap.h5"
    proc = run_writer(path, python_env, batch=2)
    wait_for_commit(proc)
    proc.kill()
    proc.communicate()
    assert read_status(path)["flags"] != 0
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r", locking=False)
    with StoreWriter(path, **crash_writer_kwargs()) as w:
        assert any("cleared superblock write flags" in r for r in w.repairs)
        n = w.n_traces
        w.append([crash_record(n)])
    assert read_status(path)["flags"] == 0
    h5py.File(path, "r").close()
    check_store(path, n + 1)


def test_truncated_copy_is_refused_and_never_grown(good_store, tmp_path):
    cut = tmp_path / "cut.h5"
    data = good_store.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    status = read_status(cut)
    assert status["eof"] > status["size"] == len(data) // 2
    result = CliRunner().invoke(main, ["verify", str(cut)])
    assert result.exit_code == 1 and "truncated" in result.output and "Traceback" not in result.output, result.output
    with pytest.raises(StoreError):
        with StoreWriter(cut, **writer_kwargs()) as w:
            w.append([make_record(50)])
    assert cut.stat().st_size == len(data) // 2  # the writer did not grow or rewrite it
