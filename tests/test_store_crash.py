"""kill -9 a real writer process at random moments; every round the store must read and resume."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_record
from tribunal.store import open_store
from tribunal.store.superblock import read_status
from tribunal.store.verify import verify_store

HERE = Path(__file__).parent


def run_writer(path, env, dtype="float16", batch=4):
    return subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), str(path), str(batch), dtype],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE,
    )


def check_store(path, at_least):
    """Read-only open of a possibly crashed store: committed traces are whole and exact.

    verify checks the structure of all of them; the content check covers the last 20 (where a crash
    lands) and 20 others at random, to keep the rounds fast as the store grows.
    """
    with open_store(path) as store:
        assert store.n_traces >= at_least
        assert verify_store(store) == []
        n = store.n_traces
        for i in sorted(set(range(max(0, n - 20), n)) | set(random.Random(n).sample(range(n), min(n, 20)))):
            rec = make_record(i, layers=(2, 5, 9), d_model=64)
            t = store.trace(i)
            assert (t.problem_id, t.sample_index) == (rec.problem_id, rec.sample_index)
            np.testing.assert_array_equal(t.token_ids, rec.token_ids)
            np.testing.assert_allclose(store.activations(9, i), rec.activations[2], atol=1e-2, rtol=1e-2)
        return store.n_traces


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sigkill_at_random_moments(tmp_path, python_env, dtype):
    rounds = 25 if dtype == "float16" else 10
    path = tmp_path / "crash.h5"
    rng = random.Random(1234)
    committed, repaired_rounds = 0, 0
    for round_no in range(rounds):
        proc = run_writer(path, python_env, dtype)
        # Kill anywhere: during interpreter start, the open/repair, or mid-append.
        time.sleep(rng.uniform(0.05, 1.6))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err
        printed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        if "repairs=" in out and "repairs=0" not in out:
            repaired_rounds += 1
        if not path.exists() or path.stat().st_size == 0:
            continue  # killed before the file was created
        # (b) readable read-only, before any repair, with everything that was reported committed
        committed = check_store(path, max(printed, default=committed))
    # (a) the next open for append repairs with no manual step and resumes
    proc = run_writer(path, python_env, dtype, batch=2)
    deadline = time.time() + 60
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("committed"):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    assert any(line.startswith("committed") for line in lines), lines
    assert repaired_rounds >= rounds // 2  # most rounds found a crashed file and repaired it on open
    final = check_store(path, committed + 2)
    assert final >= committed + 2
    assert read_status(path)["flags"] in (0, 5, 4, 1)  # flags may be set: SIGTERM kills without closing


def test_killed_writer_leaves_flags_that_plain_hdf5_refuses_and_we_repair(tmp_path, python_env):
    """The known trap: a plain reopen fails after kill -9; our open-for-append clears it."""
    import h5py

    from tribunal.store import StoreWriter
    from conftest import writer_kwargs

    path = tmp_path / "trap.h5"
    proc = run_writer(path, python_env, batch=2)
    while not proc.stdout.readline().startswith("committed"):
        pass
    proc.kill()
    proc.communicate()
    assert read_status(path)["flags"] != 0
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r", locking=False)
    with StoreWriter(path, **writer_kwargs(layers=(2, 5, 9), d_model=64)) as w:
        assert any("cleared superblock write flags" in r for r in w.repairs)
        n = w.n_traces
        w.append([make_record(n, layers=(2, 5, 9), d_model=64)])
    assert read_status(path)["flags"] == 0
    h5py.File(path, "r").close()
    check_store(path, n + 1)


def test_dead_writer_is_taken_over(tmp_path, python_env):
    from conftest import writer_kwargs
    from tribunal.store import StoreWriter
    from tribunal.store.lock import lock_path, read_holder, writer_is_live

    path = tmp_path / "s.h5"
    proc = run_writer(path, python_env, batch=1, )
    while not proc.stdout.readline().startswith("committed"):
        pass
    assert writer_is_live(path) and read_holder(path)["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert lock_path(path).exists() and not writer_is_live(path)
    with StoreWriter(path, **writer_kwargs(layers=(2, 5, 9), d_model=64)) as w:
        assert w._lock.took_over["pid"] == proc.pid
    assert not lock_path(path).exists()


def test_kill_while_reopening_leaves_a_readable_store(tmp_path, python_env):
    """The reopen window: a writer killed after opening an existing store, while it checks the identity.

    Opened plainly for write, the superblock would say "open for write, not SWMR", which SWMR readers
    refuse; the writer opens straight into SWMR-write mode, so readers still open the store.
    """
    from conftest import writer_kwargs
    from tribunal.store import StoreWriter

    path = tmp_path / "reopen.h5"
    with StoreWriter(path, **writer_kwargs(layers=(2, 5, 9), d_model=64)) as w:
        w.append([make_record(i, layers=(2, 5, 9), d_model=64) for i in range(3)])
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2])\n"
        "from conftest import writer_kwargs\n"
        "from tribunal.store import StoreWriter\n"
        "from tribunal.store import format as fmt\n"
        "fmt.StoreIdentity.differences = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # while checking\n"
        "StoreWriter(sys.argv[1], **writer_kwargs(layers=(2, 5, 9), d_model=64)).open()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path), str(HERE)], env=python_env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert read_status(path)["flags"] != 0  # it really died holding the file
    assert check_store(path, 3) == 3  # read-only, no repair
