"""Stop signals during start-up (tribunal.traces.stop): handlers in place from the first line of `python -m tribunal`,
so a SIGUSR1 while Python imports torch or the model loads ends the run with the resumable exit code and leaves no
store, and the same command then runs to the end."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.stop import EXIT_INTERRUPTED


@pytest.mark.parametrize("delay", [0.15, 0.5, 1.0])
def test_a_stop_signal_in_the_first_second_is_resumable(tmp_path, tiny_model, small_problems, python_env, delay):
    out = tmp_path / "s.h5"
    args = [sys.executable, "-m", "tribunal", "generate", "--out", str(out), "--model", str(tiny_model), "--dataset",
            str(small_problems), "--layers", "1", "--max-new-tokens", "8", "--max-problems", "2", "--quiet"]
    proc = subprocess.Popen(args, env=python_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, stdout, stderr)
    assert "stopped by SIGUSR1" in stdout, stdout
    # and the same command then runs to the end
    done = subprocess.run(args, env=python_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_stop_signal_while_the_model_loads_is_resumable(tmp_path, tiny_model, small_problems, monkeypatch):
    """A preemption during loading: handlers are in place from the start, the store is not touched."""
    from tribunal.traces import models

    real_load = models.load_model

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while "loading"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", slow_load)
    s = run_generation(GenerateConfig(out=str(tmp_path / "g.h5"), model=str(tiny_model), dataset=str(small_problems),
                                      layers="1", max_new_tokens=8, max_problems=2, progress=False))
    assert s["status"] == "interrupted" and s["signal"] == "SIGUSR1"
    assert not (tmp_path / "g.h5").exists()
