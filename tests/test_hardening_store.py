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
