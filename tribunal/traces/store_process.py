"""The store writer in a process of its own, beside generation.

A writer thread shares the interpreter lock with the decode loop: every millisecond of
HDF5 bookkeeping it does is a millisecond the loop waits, which on a small model is
several percent. The child (`python -m tribunal.traces.store_process`, so it never
imports torch, nor re-runs the caller's script as multiprocessing's spawn would)
opens the StoreWriter, reports what the store already holds, then appends batches
as they arrive, combining whatever is queued into one commit. It runs at idle CPU
priority (storing never takes a core from the model), ignores the stop signals (the
parent decides when to stop and then sends the end of the queue), and dies with its
parent, so a kill -9 of the run leaves a store that the next open repairs, as before.
Messages travel over a socket pair (multiprocessing.connection): pickled, except
the activations, which go as raw bytes straight from their arrays.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from multiprocessing.connection import Connection

import numpy as np

log = logging.getLogger("tribunal.generate")

_START_TIMEOUT_S = 600  # seconds: opening a store on a slow cluster file system, repairs included
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WriterProcess:
    """Parent side: open() -> what the store holds; put() batches; finish() -> what it holds at the end."""

    def __init__(self, writer_kwargs: dict, max_batches: int):
        self._writer_kwargs = writer_kwargs
        # Batches wait here (bounded: memory stays bounded when the disk is slow); a sender thread
        # pickles them onto the socket, so the decode loop never blocks on the child reading.
        self._outbox: queue.Queue = queue.Queue(maxsize=max_batches)
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None
        self._sender: threading.Thread | None = None
        self._pending = None  # the last batch, handed over once its device-to-host copy has landed
        self._error: BaseException | None = None
        self._closed: dict | None = None

    def open(self) -> dict:
        """Start the child, which opens the store (creating it, or repairing and checking it).

        Returns n_traces, n_tokens, labels, problems_done, done_keys and repairs; raises the child's
        error (a store of another model, a held lock ...) as it was raised there."""
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        env = dict(os.environ)  # the child imports this very tribunal, installed or not
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tribunal.traces.store_process", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self._conn.send(self._writer_kwargs)
        self._sender = threading.Thread(target=self._send_loop, name="tribunal-store-sender", daemon=True)
        self._sender.start()
        state = self._wait_for("opened", _START_TIMEOUT_S)
        if state is None:
            self._outbox.put(None)
            self._process.wait()
            raise self._error
        return state

    def put(self, records, problems_done, ready) -> None:
        """Queue a batch; blocks while `max_batches` wait (memory stays bounded when the disk is slow).

        The batch goes to the child one call later: by then its asynchronous device-to-host copy has
        long landed, so waiting on it here never makes the model wait."""
        self.check()
        if self._pending is not None:
            self._send(self._pending[:2], self._pending[2])
        self._pending = (records, problems_done, ready)

    def check(self) -> None:
        """Raise the child's error, if it reported one (the store is intact up to its last commit)."""
        self._poll(timeout=0)
        if self._error is not None:
            raise self._error

    def finish(self) -> dict:
        """Hand over the last batch, end the queue, wait for the final commit; returns the store's state."""
        try:
            if self._pending is not None and self._error is None:
                self._send(self._pending[:2], self._pending[2])
            self._pending = None
            self._send(None)
            state = self._wait_for("closed", None)
        finally:
            self._process.wait()
            self._sender.join(timeout=5)
            self._conn.close()
        if self._error is not None:
            raise self._error
        return state

    def _alive(self) -> bool:
        return self._process.poll() is None

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            try:
                _send_batch(self._conn, item)
            except OSError:  # the child is gone; _wait_for and check() say why
                return
            if item is None:
                return

    def _send(self, item, ready=None) -> None:
        if ready is not None:
            ready()
        while True:
            try:
                self._outbox.put(item, timeout=1.0)
                return
            except queue.Full:
                self._poll(timeout=0)
                if not self._alive():  # a dead child must not block the run; finish() says why
                    return

    def _wait_for(self, kind: str, timeout):
        """Read results until `kind` arrives (its payload) or the child ends without it (None)."""
        waited = 0.0
        while True:
            got = self._poll(timeout=1.0)
            if got is not None and got[0] == kind:
                return got[1]
            if got is not None and got[0] == "error" and kind == "opened":
                return None  # the store could not be opened; nothing follows
            if got is None and self._error is not None:
                return None  # the child died (_poll said so)
            waited += 1.0
            if timeout is not None and waited >= timeout:
                self._process.kill()
                self._error = RuntimeError(f"the store writer process did not open the store in {timeout} s")
                return None

    def _poll(self, timeout: float):
        """Take one result if one arrives within `timeout` s; errors are kept, the first one wins."""
        try:
            if not self._conn.poll(timeout):
                return None
            kind, payload = self._conn.recv()
        except (EOFError, OSError):  # the child closed its end: it exited, or is about to
            self._process.wait()
            if self._closed is None and self._error is None:
                self._error = RuntimeError(
                    f"the store writer process died (exit code {self._process.returncode}); the store is "
                    "intact up to its last commit: rerun to resume")
            return None
        if kind == "error":
            self._error = self._error or payload
        elif kind == "closed":
            self._closed = payload
        return kind, payload


def _send_batch(conn: Connection, item) -> None:
    """A batch travels as its records without activations (pickled), then each trace's activations
    as raw bytes sent straight from its array. Pickling them would build a fresh copy of the whole
    batch in the generating process, an allocation of megabytes per batch beside the model's own
    (the allocator churn that cost capture several percent on a CPU). None ends the queue."""
    if item is None:
        conn.send(None)
        return
    records, problems_done = item
    arrays = [np.ascontiguousarray(r.activations) for r in records]
    conn.send(([dataclasses.replace(r, activations=None) for r in records],
               [(a.shape, a.dtype.str) for a in arrays], problems_done))
    for array in arrays:
        conn.send_bytes(array)


class _ConnectionQueue:
    """The child's view of the socket: get / get_nowait for batches, put for results."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def get(self):
        """(records, problems_done), or None at the end of the queue."""
        try:
            message = self.conn.recv()
            if message is None:
                return None
            records, layouts, problems_done = message
            for record, (shape, dtype) in zip(records, layouts):
                record.activations = np.frombuffer(self.conn.recv_bytes(), dtype).reshape(shape)
            return records, problems_done
        except EOFError:  # the parent is gone (PR_SET_PDEATHSIG is Linux only): close what is committed
            return None

    def get_nowait(self):
        if not self.conn.poll(0):
            raise queue.Empty
        return self.get()

    def put(self, item) -> None:
        try:
            self.conn.send(item)
        except OSError:  # the parent is gone; nobody is listening
            pass


def _child_main(fd: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _yield_cpu_to_model()
    conn = Connection(fd)
    channel = _ConnectionQueue(conn)
    serve(conn.recv(), channel, channel)
    # The store is closed and the parent told: leave without the interpreter's teardown, which the
    # parent would otherwise wait for at the end of every run.
    conn.close()
    os._exit(0)


def serve(writer_kwargs: dict, tasks, results) -> None:
    """Open the store, report its state, append what arrives on `tasks` until None, close, report again.

    Messages on `results`: ("opened", state), ("error", exception) for the first failure, and
    ("closed", state) once the store is closed (also after a failure: the state is the last commit)."""
    from ..store.writer import StoreWriter

    writer = StoreWriter(**writer_kwargs)
    try:
        writer.open()
    except BaseException as exc:  # noqa: BLE001  (handed to the parent, which raises it)
        results.put(("error", _portable(exc)))
        return
    failed = False
    try:
        results.put(("opened", _state(writer)))
        while True:
            items, last = [tasks.get()], False
            if items[0] is None:
                break
            # Whatever else is already queued joins this commit: fewer flushes and fsyncs when the
            # generator runs ahead of the disk, and nothing waits when it does not.
            while True:
                try:
                    more = tasks.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                items.append(more)
            if not failed:
                try:
                    writer.append([r for records, _ in items for r in records],
                                  problems_done=[p for _, done in items for p in done])
                except BaseException as exc:  # noqa: BLE001
                    failed = True
                    results.put(("error", _portable(exc)))
            if last:
                break
    finally:
        state = _state(writer)
        writer.close()
        results.put(("closed", state))


def _state(writer) -> dict:
    return {
        "n_traces": writer.n_traces, "n_tokens": writer.n_tokens, "labels": Counter(writer.label_counts()),
        "problems_done": writer.problems_done(), "done_keys": writer.done_keys(), "repairs": list(writer.repairs),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (tribunal's errors do), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _yield_cpu_to_model() -> None:
    """Put this process in Linux's SCHED_IDLE class: it runs when a core would otherwise idle.
    Lowering one's own priority needs no privileges."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux: the writer shares the CPU as an equal
        log.debug("store writer keeps its CPU priority: %s", exc)


def _die_with_parent(parent_pid: int) -> None:
    """Linux PR_SET_PDEATHSIG: a kill -9 of the run takes the writer with it (it holds the store's lock)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            line = next(x for x in fh if x.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return float("nan")


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
