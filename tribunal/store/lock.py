"""One writer per store: an flock on a sidecar file that names its holder.

The kernel drops an flock when its process dies, kill -9 included, so a store
whose writer died can be taken over at once, while a live writer (on this host
or, on a file system with cluster-wide flock, on another) is named in the
refusal. The sidecar `STORE.lock` holds JSON {host, pid, started} for that
message and for `inspect`; it is removed on a clean close.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import StoreLockedError
from .format import timestamp


def lock_path(store_path) -> Path:
    return Path(f"{store_path}.lock")


def read_holder(store_path) -> dict | None:
    """Who holds (or last held) the lock, or None when there is no lock file."""
    try:
        text = lock_path(store_path).read_text()
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None


def writer_is_live(store_path) -> bool:
    """True while some process holds the writer lock (it is tested, never taken)."""
    path = lock_path(store_path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        return _pid_alive(read_holder(store_path))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _pid_alive(holder) -> bool:
    """Fallback where flock is unsupported: a holder on this host is alive if its pid is."""
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """Exclusive writer lock on a store; use as a context manager or acquire()/release()."""

    def __init__(self, store_path):
        self.store_path = Path(store_path)
        self.path = lock_path(store_path)
        self._fd = None
        self._flock = False
        self.took_over = None

    def acquire(self) -> "WriterLock":
        previous = read_holder(self.store_path)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    # No flock on this file system (Lustre/GPFS without it): the holder's pid decides.
                    if _pid_alive(previous):
                        os.close(fd)
                        raise StoreLockedError(self._held_message(previous)) from None
                    self._flock = False
                    break
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(self._held_message(read_holder(self.store_path) or {})) from None
                raise StoreLockedError(
                    f"cannot lock {self.path}: {exc.strerror}. On Lustre/GPFS mount with flock support "
                    f"or keep stores on a file system that has it (see docs/cluster.md, 'Cluster file systems')"
                ) from None
            # The file may have been unlinked by a closing writer between open and flock.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self._flock = True
                break
            os.close(fd)
        self._fd = fd
        self.took_over = previous
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": timestamp()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def _held_message(self, holder: dict) -> str:
        return (f"{self.store_path} is being written by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to finish, "
                f"or stop it, then retry")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._flock:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
