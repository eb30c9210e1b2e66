"""The store's writer process (tribunal.traces.store_process): batches combined into commits, handed over once their
copies land, at idle priority, deaf to stop signals, errors and death reported to the parent, and a child of its own
module, so a script without a main guard is not re-run in it."""

import os
import queue
import signal
import subprocess
import sys

import pytest

from conftest import make_record, writer_kwargs
from tribunal.errors import IncompatibleStoreError, StoreError
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.store_process import WriterProcess, serve


def test_writer_combines_queued_batches_into_one_commit(tmp_path):
    """Whatever is queued when the writer gets to it goes to the store as one commit."""
    tasks, results = queue.Queue(), queue.Queue()
    for batch in range(3):
        tasks.put(([make_record(batch * 2), make_record(batch * 2 + 1)], [(batch, 2)]))
    tasks.put(None)
    serve(dict(path=tmp_path / "w.h5", **writer_kwargs()), tasks, results)
    opened, closed = results.get_nowait(), results.get_nowait()
    assert opened[0] == "opened" and opened[1]["n_traces"] == 0
    assert closed[0] == "closed" and closed[1]["n_traces"] == 6 and closed[1]["problems_done"] == {0, 1, 2}
    with open_store(tmp_path / "w.h5") as store:
        assert store.n_traces == 6 and verify_store(store) == []
        assert store.shards[0].committed["commits"] == 1


def test_writer_process_takes_batches_once_their_copies_land_and_yields_the_cpu(tmp_path):
    """A batch is handed over one put later, after its device-to-host copy is awaited; the writer
    process runs in SCHED_IDLE and ignores stop signals (the parent decides when to stop)."""
    ready = []
    writes = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=2)
    assert writes.open()["n_traces"] == 0
    child = writes._process.pid
    assert os.sched_getscheduler(child) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the model's process keeps its priority
    for batch in range(3):
        writes.put([make_record(batch)], [], lambda batch=batch: ready.append(batch))
        assert ready == list(range(batch))
    os.kill(child, signal.SIGUSR1)
    os.kill(child, signal.SIGINT)
    state = writes.finish()
    assert ready == [0, 1, 2] and state["n_traces"] == 3
    with open_store(tmp_path / "w.h5") as store:
        assert store.n_traces == 3 and verify_store(store) == []


def test_writer_process_errors_reach_the_parent(tmp_path):
    """A store of other settings is refused in the child; the parent raises the same error."""
    writes = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=2)
    writes.open()
    writes.put([make_record(0)], [], lambda: None)
    writes.finish()
    other = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs(d_model=32)), max_batches=2)
    with pytest.raises(IncompatibleStoreError, match="d_model"):
        other.open()
    # a batch the store refuses: the error comes back, the child still closes the store cleanly
    again = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=2)
    again.open()
    again.put([make_record(1, d_model=8)], [], lambda: None)
    with pytest.raises(StoreError, match="activations have shape"):
        again.finish()
    with open_store(tmp_path / "w.h5") as store:
        assert store.n_traces == 1 and verify_store(store) == []


def test_a_dead_writer_process_is_a_clear_error(tmp_path):
    """The run does not hang on a writer killed from outside; it says so and that rerunning resumes."""
    writes = WriterProcess(dict(path=tmp_path / "w.h5", **writer_kwargs()), max_batches=1)
    writes.open()
    os.kill(writes._process.pid, signal.SIGKILL)
    writes._process.wait()
    with pytest.raises(RuntimeError, match="writer process died.*rerun to resume"):
        writes.put([make_record(0)], [], lambda: None)
    with pytest.raises(RuntimeError, match="rerun to resume"):
        writes.finish()


def test_a_script_without_a_main_guard_can_generate(tmp_path, tiny_model, small_problems, python_env):
    """The writer process is its own module's __main__: the caller's script is not re-run in it."""
    script = tmp_path / "quick.py"
    script.write_text(
        "from tribunal.traces.generate import GenerateConfig, run_generation\n"
        "print('RUN')\n"
        f"s = run_generation(GenerateConfig(out={str(tmp_path / 'g.h5')!r}, model={str(tiny_model)!r}, "
        f"dataset={str(small_problems)!r}, layers='1', max_new_tokens=8, samples_per_problem=1, "
        "max_problems=2, keep_all=True, progress=False))\n"
        "print(s['status'], s['traces'])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=python_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RUN", "done", "2"]
