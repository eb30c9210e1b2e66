"""Failure paths of the store that real cluster runs meet: no flock, missing attributes, a full disk,
a user's own h5py handle, shards beside their merge, long UTF-8 answers."""

import errno
import fcntl
import os
import socket

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_record, writer_kwargs
from tribunal.cli import main
from tribunal.errors import StoreLockedError
from tribunal.store import StoreWriter, open_store
from tribunal.store.lock import WriterLock, lock_path


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (Lustre/GPFS mounted without it): every flock raises ENOLCK."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_writer_works_without_flock(no_flock, tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(i) for i in range(3)])
        assert lock_path(path).exists()
    assert not lock_path(path).exists()
    with StoreWriter(path, **writer_kwargs()) as w:  # and appends again
        w.append([make_record(i) for i in range(3, 5)])
    with open_store(path) as s:
        assert s.n_traces == 5


def test_no_flock_falls_back_to_the_live_holder_pid(no_flock, tmp_path):
    path = tmp_path / "s.h5"
    lock_path(path).write_text('{"host": "%s", "pid": %d, "started": "x"}' % (socket.gethostname(), os.getppid()))
    with pytest.raises(StoreLockedError, match=f"pid {os.getppid()}"):
        WriterLock(path).acquire()
    dead = 2**22 + 12345  # above pid_max: no such process
    lock_path(path).write_text('{"host": "%s", "pid": %d, "started": "x"}' % (socket.gethostname(), dead))
    lock = WriterLock(path).acquire()
    assert lock.took_over["pid"] == dead
    lock.release()
    assert not lock_path(path).exists()


def documented_names():
    """Root attributes and datasets that docs/store-format.md names (the contract the tests hold the code to)."""
    import re

    from conftest import ROOT

    doc = (ROOT / "docs" / "store-format.md").read_text()
    attrs_section = doc.split("### Root attributes", 1)[1].split("All but", 1)[0]  # the list, not the prose after it
    attrs = [a for a in re.findall(r"`([a-z_]+)`", attrs_section) if a not in ("synth", "merged_from")]
    layout = doc.split("## Layout", 1)[1].split("```")[1]
    datasets = [line.split()[0].lstrip("/") for line in layout.splitlines() if line.startswith("/") and line.split()[0] != "/"]
    datasets = [d for d in datasets if not d.startswith("synth/")]
    return attrs, datasets


def _mutations():
    attrs, datasets = documented_names()
    assert "layers" in attrs and "d_model" in attrs and "traces/table" in datasets, (attrs, datasets)
    out = [("attr", a) for a in attrs]
    for d in datasets:
        out.append(("dataset", d.replace("layer_LLL", "layer_005")))
    return out


@pytest.mark.parametrize("kind,name", _mutations())
def test_a_store_missing_any_documented_part_gets_a_clear_message(good_store, kind, name):
    from tribunal.store import format as fmt

    with h5py.File(good_store, "r") as f:
        assert (name in f.attrs) if kind == "attr" else (name in f), f"the doc names {name} but stores lack it"
    with h5py.File(good_store, "r+", locking=False) as f:
        if kind == "attr":
            del f.attrs[name]
        else:
            del f[name]
    runner = CliRunner()
    verify = runner.invoke(main, ["verify", str(good_store)])
    inspect = runner.invoke(main, ["inspect", str(good_store)])
    for result in (verify, inspect):
        assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, AttributeError, TypeError, ValueError)), result.output
    if name == "format":  # without its format tag a file is just HDF5
        for result in (verify, inspect):
            assert result.exit_code == 1 and "not a tribunal store" in result.output, result.output
        return
    core = (kind == "attr" and name in fmt.CORE_ATTRS) or kind == "dataset"
    needle = f"'{name}'" if kind == "attr" else f"/{name}"
    if core or kind == "attr":  # verify fails naming it
        assert verify.exit_code == 1 and needle in verify.output, verify.output
        assert any(line.startswith("FAIL") for line in verify.output.splitlines()), verify.output
    if core:  # inspect: one line, naming it
        lines = [line for line in inspect.output.splitlines() if line]
        assert inspect.exit_code == 1 and len(lines) == 1 and needle in lines[0], inspect.output
    else:
        assert inspect.exit_code == 0, inspect.output


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs, to be filled: a real ENOSPC (tests run as root, as in CI)."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


CREATE_ON_FULL_DISK = """
import sys
from tribunal.store import StoreWriter
from tribunal.errors import StoreError
if sys.argv[2] == "no-precheck":  # as if another process filled the disk after the check
    StoreWriter._ensure_create_space = lambda self: None
try:
    StoreWriter(sys.argv[1], model_id="m", layers=list(range(20)), d_model=64, dtype="float16").open()
except StoreError as exc:
    print("ERROR", exc, flush=True)
    import os
    os._exit(3)  # HDF5's state after ENOSPC is broken; do not let its teardown muddle the test
"""


@pytest.mark.parametrize("precheck", ["precheck", "no-precheck"])
@pytest.mark.parametrize("free", [4096, 12288, 20000])
def test_disk_full_while_creating_leaves_nothing_behind(full_disk, python_env, precheck, free):
    import subprocess
    import sys

    (full_disk / "fill").write_bytes(b"x" * (2048 * 1024 - free))
    store = full_disk / "s.h5"
    done = subprocess.run([sys.executable, "-c", CREATE_ON_FULL_DISK, str(store), precheck], env=python_env,
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert done.returncode == 3 and len(lines) == 1, done.stdout + done.stderr
    assert "disk" in lines[0] or "No space" in lines[0], lines[0]
    assert sorted(p.name for p in full_disk.iterdir()) == ["fill"]  # no STORE.creating, no STORE.lock
    (full_disk / "fill").unlink()
    with StoreWriter(store, **writer_kwargs()) as w:  # the next run is not blocked
        w.append([make_record(0)])


def test_disk_full_through_the_cli_is_one_line(full_disk):
    (full_disk / "fill").write_bytes(b"x" * (2048 * 1024 - 8192))
    result = CliRunner().invoke(main, ["synth", str(full_disk / "s.h5"), "--quiet", "--traces", "4", "--problems", "2"])
    lines = [line for line in result.output.splitlines() if line]
    assert result.exit_code == 1 and len(lines) == 1 and "disk full" in lines[0], result.output
    assert sorted(p.name for p in full_disk.iterdir()) == ["fill"]


def test_reader_works_beside_the_users_own_h5py_handle(good_store):
    for flags in ({}, {"swmr": True}, {"locking": False}):
        with h5py.File(good_store, "r", **flags) as mine:
            with open_store(good_store) as store:
                assert store.n_traces == 6 and store.activations(5, 0).shape[1] == 16
            assert mine["commit"][0] == 6  # the user's handle still works


def test_inspect_refuses_shards_beside_their_merge(tmp_path):
    for s in range(2):
        with StoreWriter(tmp_path / f"shard_{s}.h5", **writer_kwargs()) as w:
            w.append([make_record(i) for i in range(s * 3, s * 3 + 3)])
    runner = CliRunner()
    assert runner.invoke(main, ["merge", str(tmp_path / "shard_*.h5"), "-o", str(tmp_path / "merged.h5"), "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "more than one shard" in result.output and "merged.h5" in result.output, result.output
    result = runner.invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "more than one shard" in result.output, result.output
    assert runner.invoke(main, ["inspect", str(tmp_path / "shard_*.h5")]).exit_code == 0
    with pytest.raises(Exception, match="read either the shards or the merged file"):
        open_store(tmp_path)


def test_synth_onto_a_plain_hdf5_file_says_not_a_store(tmp_path):
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "plain.h5"), "--quiet"])
    assert result.exit_code == 1 and "not a tribunal store" in result.output and "superblock" not in result.output, result.output
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        assert list(f["x"][:]) == [0, 1, 2]


def test_long_answers_are_cut_at_a_character_boundary(tmp_path):
    record = make_record(0)
    record.predicted = "ä" * 40  # 80 bytes of UTF-8: a 48-byte cut falls on a character boundary only by luck
    record.gold = "x" + "€" * 30  # 1 + 90 bytes: a blind 48-byte cut splits a euro sign
    with StoreWriter(tmp_path / "s.h5", **writer_kwargs()) as w:
        w.append([record])
    with open_store(tmp_path / "s.h5") as store:
        t = store.trace(0)
    assert t.predicted == "ä" * 24 and t.gold == "x" + "€" * 15
    assert "\ufffd" not in t.predicted + t.gold


def test_a_refused_resume_names_the_setting_and_both_values_in_one_line(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "deep" / "folder" / "s.h5")  # a missing folder is created
    assert runner.invoke(main, ["synth", out, "--traces", "6", "--problems", "3", "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["synth", out, "--traces", "6", "--problems", "3", "--signal", "0.6", "--quiet"])
    lines = [line for line in result.output.splitlines() if line]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "synth.signal: store has 0.8, asked 0.6" in lines[0] and "{" not in lines[0], lines[0]
