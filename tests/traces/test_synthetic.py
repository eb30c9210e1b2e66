"""Synthetic stores (tribunal/traces/synthetic.py) through `tribunal synth`: refusing a file that is not a
store, and resuming an interrupted run to the same store."""

import signal
import subprocess
import sys
import time

import h5py
import numpy as np
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.store import open_store


def test_synth_onto_a_plain_hdf5_file_says_not_a_store(tmp_path):
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "plain.h5"), "--quiet"])
    assert result.exit_code == 1 and "not a tribunal store" in result.output and "superblock" not in result.output, result.output
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        assert list(f["x"][:]) == [0, 1, 2]


def test_interrupted_synth_resumes_to_the_same_store(tmp_path, python_env):
    big = ["--traces", "400", "--problems", "100", "--layers", "3,6", "--d-model", "256", "--tokens-per-trace", "100-300",
           "--quiet"]
    cli = [sys.executable, "-m", "tribunal.cli", "synth"]
    whole = tmp_path / "whole.h5"
    subprocess.run(cli + [str(whole), *big], check=True, env=python_env, capture_output=True)
    part = tmp_path / "part.h5"
    proc = subprocess.Popen(cli + [str(part), *big], env=python_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with open_store(part) as store:
                if 0 < store.n_traces:
                    break
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    again = subprocess.run(cli + [str(part), *big], env=python_env, capture_output=True, text=True)
    assert again.returncode == 0 and "resumed after" in again.stdout, again.stdout + again.stderr
    with open_store(whole) as a, open_store(part) as b:
        assert b.n_traces == a.n_traces == 400
        order_a = np.argsort(a.table["trace_id"])
        order_b = np.argsort(b.table["trace_id"])
        for i, j in list(zip(order_a, order_b))[::37]:
            np.testing.assert_array_equal(a.activations(6, int(i)), b.activations(6, int(j)))
