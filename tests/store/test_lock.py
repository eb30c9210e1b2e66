"""The writer lock (tribunal/store/lock.py): one writer per store, named when refused, taken over when dead,
and a fallback to the holder's pid on file systems without flock."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import make_record, writer_kwargs
from tribunal.errors import StoreLockedError
from tribunal.store import StoreWriter, open_store
from tribunal.store.lock import WriterLock, lock_path, read_holder, writer_is_live

from .killed_writers import crash_writer_kwargs, run_writer, wait_for_commit


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(0)])
        with pytest.raises(StoreLockedError, match=r"pid \d+ on host"):
            StoreWriter(path, **writer_kwargs()).open()
        # another process is refused the same way
        code = (
            "import sys; from tribunal.store import StoreWriter\n"
            "try:\n StoreWriter(sys.argv[1], model_id='test/model', layers=(2,5), d_model=16).open()\n"
            "except Exception as e: print(type(e).__name__, e)"
        )
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True).stdout
        assert "StoreLockedError" in out and f"pid {os.getpid()}" in out


def test_dead_writer_is_taken_over(tmp_path, python_env):
    path = tmp_path / "s.h5"
    proc = run_writer(path, python_env, batch=1)
    wait_for_commit(proc)
    assert writer_is_live(path) and read_holder(path)["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert lock_path(path).exists() and not writer_is_live(path)
    with StoreWriter(path, **crash_writer_kwargs()) as w:
        assert w._lock.took_over["pid"] == proc.pid
    assert not lock_path(path).exists()


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
