"""Real writer processes to kill (crash_writer.py), and the check that what they committed survived."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import make_record, writer_kwargs
from tribunal.store import open_store
from tribunal.store.verify import verify_store

from .monitored import FIELDS, assert_same_scores, monitored_record

CRASH_WRITER = Path(__file__).with_name("crash_writer.py")
LAYERS, D_MODEL = (2, 5, 9), 64  # as crash_writer.py writes


def crash_writer_kwargs(monitored: bool = False) -> dict:
    """StoreWriter arguments that match crash_writer.py's store, to reopen it in the test process."""
    extra = dict(monitor_fields=FIELDS, exit_table=True) if monitored else {}
    return writer_kwargs(layers=LAYERS, d_model=D_MODEL, **extra)


def crash_record(index: int, monitored: bool = False):
    return (monitored_record if monitored else make_record)(index, layers=LAYERS, d_model=D_MODEL)


def run_writer(path, env, dtype="float16", batch=4, pause=None, monitored=False) -> subprocess.Popen:
    """crash_writer.py appending to `path` until killed; its stdout is a pipe of 'opened'/'committed' lines."""
    args = [sys.executable, str(CRASH_WRITER), str(path), str(batch), dtype] + ([str(pause)] if pause else [])
    args += ["--monitored"] if monitored else []
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_commit(proc: subprocess.Popen) -> None:
    """Block until the writer has committed once."""
    while True:
        line = proc.stdout.readline()
        assert line, f"the writer ended before its first commit: {proc.stderr.read()}"
        if line.startswith("committed"):
            return


def check_store(path, at_least: int, monitored: bool = False) -> int:
    """Read-only open of a possibly crashed store: committed traces are whole and exact; returns their count.

    verify checks the structure of all of them (and their monitor scores and exit records, for a monitored
    store); the content check covers the last 20 (where a crash
    lands) and 20 others at random, to keep the rounds fast as the store grows.
    """
    with open_store(path) as store:
        assert store.n_traces >= at_least
        assert verify_store(store) == []
        n = store.n_traces
        for i in sorted(set(range(max(0, n - 20), n)) | set(random.Random(n).sample(range(n), min(n, 20)))):
            rec = crash_record(i, monitored)
            t = store.trace(i)
            if monitored:
                assert_same_scores(t, rec)
            assert (t.problem_id, t.sample_index) == (rec.problem_id, rec.sample_index)
            np.testing.assert_array_equal(t.token_ids, rec.token_ids)
            np.testing.assert_allclose(store.activations(9, i), rec.activations[2], atol=1e-2, rtol=1e-2)
        return n
