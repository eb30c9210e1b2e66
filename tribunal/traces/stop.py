"""Stop signals for long runs: one small object, as in submitit. The handler only records the signal; the
work loop stops at a safe point, closes the store and exits with EXIT_INTERRUPTED (resumable).

Imports nothing heavy, so `python -m tribunal` can catch a stop from its first line (catch_early), long before
torch or transformers load: a preemption during start-up is then an ordinary resumable stop.
"""

from __future__ import annotations

import signal
import threading

# Exit codes of `tribunal generate` / `tribunal run` (bin/tribunal-task and the slurm templates rely on them).
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal, store closed cleanly, rerun to resume

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_early: dict = {"received": None}


def _record_early(signum, frame):
    _early["received"] = signal.Signals(signum).name


def catch_early() -> None:
    """Record stop signals from now on (before the slow imports); GracefulStop takes over what was received."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_early)


class GracefulStop:
    """SIGUSR1/SIGTERM/SIGINT set a flag; the loop stops at a safe point."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self.received = self.received or _early["received"]  # a stop that came during start-up
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.received is not None
