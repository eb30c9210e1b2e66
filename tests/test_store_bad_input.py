"""Bad input gets a one-line error through the CLI, and nothing already stored is lost."""

import subprocess
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from conftest import make_record, writer_kwargs
from tribunal.cli import main
from tribunal.errors import StoreError
from tribunal.store import StoreWriter, open_store
from tribunal.store.verify import verify_store


def one_line_error(args, needle):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert needle in lines[0], lines[0]


@pytest.fixture
def store(good_store):
    return good_store


def test_missing_path(tmp_path):
    one_line_error(["inspect", str(tmp_path / "nope.h5")], "does not exist")
    one_line_error(["verify", str(tmp_path / "nope*.h5")], "no store files match")


def test_not_hdf5_and_zero_length(tmp_path):
    (tmp_path / "notes.h5").write_text("hello")
    (tmp_path / "zero.h5").write_bytes(b"")
    one_line_error(["inspect", str(tmp_path / "notes.h5")], "not an HDF5 file")
    one_line_error(["verify", str(tmp_path / "zero.h5")], "empty (0 bytes)")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        StoreWriter(tmp_path / "notes.h5", **writer_kwargs()).open()
    assert (tmp_path / "notes.h5").read_text() == "hello"  # untouched


def test_hdf5_that_is_not_a_store(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    one_line_error(["inspect", str(tmp_path / "other.h5")], "not a tribunal store")


def test_truncated_copy(store, tmp_path):
    cut = tmp_path / "cut.h5"
    data = store.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["verify", str(cut)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    with pytest.raises(StoreError):
        with StoreWriter(cut, **writer_kwargs()) as w:
            w.append([make_record(50)])
    assert cut.stat().st_size == len(data) // 2  # the writer did not grow or rewrite it


def test_newer_schema(store):
    with h5py.File(store, "r+") as f:
        f.attrs["schema_version"] = 99
    one_line_error(["inspect", str(store)], "newer than this tribunal")
    with pytest.raises(StoreError, match="upgrade tribunal"):
        StoreWriter(store, **writer_kwargs()).open()


def test_layer_not_in_store(store):
    with open_store(store) as s:
        with pytest.raises(StoreError, match=r"layer\(s\) \[3\] are not in the store; it has layers \[2, 5\]"):
            s.aggregate(3)
        with pytest.raises(StoreError, match="layer 3 is not in"):
            s.activations(3, 0)


def test_empty_store(tmp_path):
    path = tmp_path / "empty.h5"
    with StoreWriter(path, **writer_kwargs()):
        pass
    result = CliRunner().invoke(main, ["inspect", "--json", str(path)])
    assert result.exit_code == 0 and '"traces": 0' in result.output
    assert CliRunner().invoke(main, ["verify", str(path)]).exit_code == 0
    one_line_error(["inspect", "--trace", "0", str(path)], "does not exist")


def test_verify_reports_broken_invariants(store):
    with h5py.File(store, "r+") as f:
        table = f["traces/table"]
        row = table[2]
        row["token_start"] += 1
        table[2] = row
        acts = f["activations/layer_002"]
        acts[3, 0] = float("nan")
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert result.exit_code == 1
    assert "not contiguous" in result.output and "NaN/Inf" in result.output


def _mount_small_disk(where: Path, size="6m"):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_disk_full_keeps_the_last_commit_and_resumes(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_small_disk(disk):
        pytest.skip("cannot mount a small tmpfs here (needs root); the disk-full test runs in CI as root")
    try:
        path = disk / "s.h5"
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (2 << 20))
        kwargs = writer_kwargs(layers=(2, 5), d_model=256)
        n = 0
        with pytest.raises(StoreError, match="free disk space, then rerun to resume") as info:
            with StoreWriter(path, **kwargs) as w:
                while True:
                    w.append([make_record(i, layers=(2, 5), d_model=256, tokens=60) for i in range(n, n + 2)])
                    n = w.n_traces
        assert "intact up to its last commit" in str(info.value)
        with open_store(path) as s:  # valid up to the last commit, read-only, before any repair
            assert s.n_traces == n and verify_store(s) == []
        filler.unlink()
        with StoreWriter(path, **kwargs) as w:  # resumes once space is freed
            assert w.n_traces == n
            w.append([make_record(i, layers=(2, 5), d_model=256, tokens=60) for i in range(n, n + 2)])
        with open_store(path) as s:
            assert s.n_traces == n + 2 and verify_store(s) == []
    finally:
        subprocess.run(["umount", str(disk)])
