"""StoreWriter (tribunal/store/writer.py): what goes in comes out, reopening, refusals, a full disk, kill -9;
the optional monitor scores and exit records likewise."""

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT, make_record, writer_kwargs
from tribunal.cli import main
from tribunal.errors import IncompatibleStoreError, StoreError
from tribunal.store import StoreWriter, open_store
from tribunal.store.superblock import read_status
from tribunal.store.verify import verify_store

from .killed_writers import check_store, crash_record, crash_writer_kwargs, run_writer
from .monitored import FIELDS, assert_same_scores, monitored_kwargs, monitored_record


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-2), ("bfloat16", 1e-2), ("float32", 0)])
def test_roundtrip_every_field(tmp_path, dtype, tol):
    path = tmp_path / "s.h5"
    recs = [make_record(i) for i in range(7)]
    with StoreWriter(path, **writer_kwargs(dtype=dtype)) as w:
        w.append(recs[:3])
        w.append(recs[3:])
    with open_store(path) as store:
        assert store.n_traces == 7 and store.dtype == dtype
        assert store.n_tokens == sum(r.n_tokens for r in recs)
        for i, rec in enumerate(recs):
            t = store.trace(i)
            assert (t.problem_id, t.sample_index, t.label) == (rec.problem_id, rec.sample_index, rec.label)
            assert t.text == rec.text and t.predicted == rec.predicted
            np.testing.assert_array_equal(t.token_ids, rec.token_ids)
            assert t.is_generated.sum() == rec.n_tokens - rec.prompt_length
            np.testing.assert_allclose(t.logprobs[rec.prompt_length:], rec.logprobs, rtol=1e-6)
            assert np.isnan(t.logprobs[: rec.prompt_length]).all()
            for j, layer in enumerate((2, 5)):
                got = store.activations(layer, i)
                assert got.dtype == np.float32
                np.testing.assert_allclose(got, rec.activations[j], rtol=tol, atol=tol)
        assert verify_store(store) == []


def test_reopen_appends_and_refuses_duplicates(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(0), make_record(1)])
    with StoreWriter(path, **writer_kwargs()) as w:
        assert w.n_traces == 2 and w.done_keys() == {(0, 0), (0, 1)}
        with pytest.raises(StoreError, match=r"already in"):
            w.append([make_record(1)])
        w.append([make_record(2)])
    with open_store(path) as store:
        assert store.n_traces == 3
        assert verify_store(store) == []


@pytest.mark.parametrize(
    "change,needle",
    [({"layers": (2, 6)}, "layers"), ({"d_model": 32}, "d_model"), ({"dtype": "bfloat16"}, "dtype"),
     ({"model_id": "other/model"}, "model_id")],
)
def test_reopen_with_other_identity_is_refused(tmp_path, change, needle):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(0)])
    kwargs = writer_kwargs()
    kwargs.update(change)
    with pytest.raises(IncompatibleStoreError, match=needle):
        StoreWriter(path, **kwargs).open()
    with open_store(path) as store:  # nothing lost
        assert store.n_traces == 1


def test_bad_records_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(0)])
        bad = make_record(1)
        bad.activations = bad.activations[:, :-1]
        with pytest.raises(StoreError, match="shape"):
            w.append([make_record(2), bad])
        bad = make_record(3, label="maybe")
        with pytest.raises(StoreError, match="label"):
            w.append([bad])
    with open_store(path) as store:
        assert store.n_traces == 1 and verify_store(store) == []


def test_long_answers_are_cut_at_a_character_boundary(tmp_path):
    record = make_record(0)
    record.predicted = "ä" * 40  # 80 bytes of UTF-8: a 48-byte cut falls on a character boundary only by luck
    record.gold = "x" + "€" * 30  # 1 + 90 bytes: a blind 48-byte cut splits a euro sign
    with StoreWriter(tmp_path / "s.h5", **writer_kwargs()) as w:
        w.append([record])
    with open_store(tmp_path / "s.h5") as store:
        t = store.trace(0)
    assert t.predicted == "ä" * 24 and t.gold == "x" + "€" * 15
    assert "\ufffd" not in t.predicted + t.gold


def test_a_file_that_is_not_hdf5_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "notes.h5").write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        StoreWriter(tmp_path / "notes.h5", **writer_kwargs()).open()
    assert (tmp_path / "notes.h5").read_text() == "hello"


# -- monitor scores and exit records ----------------------------------------------------------------------


def test_monitor_scores_and_exit_records_round_trip_and_resume(tmp_path):
    path = tmp_path / "s.h5"
    recs = [monitored_record(i) for i in range(9)]
    with StoreWriter(path, **monitored_kwargs()) as w:
        w.append(recs[:4])
    with StoreWriter(path, **monitored_kwargs()) as w:  # reopened: the same fields, appended under the same commit
        assert w.n_traces == 4
        w.append(recs[4:])
    with open_store(path) as store:
        assert store.monitor_fields == FIELDS and len(store.exit_table) == store.n_traces == 9
        for i, rec in enumerate(recs):
            assert_same_scores(store.trace(i), rec)
        assert verify_store(store) == []
        f = store.shards[0].file
        assert f["monitor/chunk_probability"].chunks == f["tokens/logprob"].chunks  # chunked like the token axis
        for name in ("monitor", "monitor/chunk_probability", "monitor/token_score", "traces/exit"):
            assert "NaN" in f[name].attrs["description"] or "exit_chunk" in f[name].attrs["description"], name
        assert dict(f["traces/exit"].dtype.fields["rule"][0].metadata["enum"]) == {"none": 0, "probe": 1,
                                                                                   "confidence": 2}
    with StoreWriter(tmp_path / "plain.h5", **writer_kwargs()) as w:  # a store without them reads as before
        w.append([make_record(0)])
    with open_store(tmp_path / "plain.h5") as store:
        assert store.monitor_fields == () and store.exit_table is None
        assert store.trace(0).monitor is None and store.trace(0).exit is None
        assert "monitor" not in store.shards[0].file and "traces/exit" not in store.shards[0].file


@pytest.mark.parametrize("created,asked,needle", [
    (dict(monitor_fields=FIELDS, exit_table=True), dict(monitor_fields=("token_score",), exit_table=True),
     "monitor fields: store has ['chunk_probability', 'token_score'], asked ['token_score']"),
    (dict(monitor_fields=FIELDS, exit_table=True), dict(monitor_fields=FIELDS), "exit table: store has one, asked none"),
    ({}, dict(monitor_fields=FIELDS), "monitor fields: store has [], asked ['chunk_probability', 'token_score']"),
    ({}, dict(exit_table=True), "exit table: store has none, asked one"),
])
def test_reopen_with_other_monitor_fields_or_exit_table_is_refused(tmp_path, created, asked, needle):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs(**created)) as w:
        w.append([monitored_record(0, monitor="monitor_fields" in created, exit="exit_table" in created)])
    with pytest.raises(IncompatibleStoreError, match="different settings") as info:
        StoreWriter(path, **writer_kwargs(**asked)).open()
    assert needle in str(info.value)
    with open_store(path) as store:
        assert store.n_traces == 1


def _broken(index, change):
    rec = monitored_record(index)
    change(rec)
    return rec


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize("change,needle", [
    (lambda r: setattr(r, "monitor", None), "has monitor fields []"),
    (lambda r: r.monitor.pop("token_score"), "has monitor fields ['chunk_probability']"),
    (lambda r: _set(r.monitor, "token_score", r.monitor["token_score"][:-1]), "expected one per token"),
    (lambda r: _set(r.monitor["token_score"], 0, 1.0), "values on prompt tokens"),
    (lambda r: _set(r.monitor["chunk_probability"], -1, 1.5), "outside [0, 1]"),
    (lambda r: setattr(r, "exit", None), "lacks an exit record"),
    (lambda r: r.exit.pop("score"), "exit record has keys"),
    (lambda r: _set(r.exit, "rule", "maybe"), "not one of ['none', 'probe', 'confidence']"),
    (lambda r: _set(r.exit, "exit_chunk", 2), "with exit_chunk 2 (rule 'none' exactly when -1)"),
    (lambda r: _set(r.exit, "thinking_tokens", r.exit["thinking_tokens"] - 1), "generated tokens"),
    (lambda r: r.exit.update(rule="probe", exit_chunk=0, thinking_tokens=r.exit["thinking_tokens"] + 1,
                             forced_tokens=-1), "negative token counts"),
])
def test_records_that_do_not_fit_the_stores_scores_are_refused_before_writing(tmp_path, change, needle):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **monitored_kwargs()) as w:
        w.append([monitored_record(0)])
        with pytest.raises(StoreError) as info:
            w.append([monitored_record(2), _broken(4, change)])  # 4: an even trace, no exit
        assert needle in str(info.value) and "problem 1, sample 1" in str(info.value)
    with StoreWriter(tmp_path / "plain.h5", **writer_kwargs()) as w:
        with pytest.raises(StoreError, match="has monitor fields .* stores none"):
            w.append([monitored_record(0, exit=False)])
        with pytest.raises(StoreError, match="has an exit record, but .* has no exit table"):
            w.append([monitored_record(0, monitor=False)])
    with open_store(path) as store:
        assert store.n_traces == 1 and verify_store(store) == []


def test_uncommitted_monitor_rows_and_exit_records_are_cut_back_on_reopen(tmp_path):
    """Rows a killed writer left past the commit in /monitor/* and /traces/exit go with the rest on reopen."""
    import h5py

    path = tmp_path / "s.h5"
    with StoreWriter(path, **monitored_kwargs()) as w:
        w.append([monitored_record(i) for i in range(3)])
        tokens = w.n_tokens
    with h5py.File(path, "r+") as f:  # as a writer killed after step 2 of a commit leaves them
        for name in ("monitor/chunk_probability", "monitor/token_score", "tokens/token_id"):
            f[name].resize((tokens + 7,))
        f["traces/exit"].resize((5,))
    with StoreWriter(path, **monitored_kwargs()) as w:
        assert any("monitor/token_score: discarded 7" in r for r in w.repairs), w.repairs
        assert any("traces/exit: discarded 2" in r for r in w.repairs), w.repairs
        assert w._file["monitor/chunk_probability"].shape == (tokens,) and w._file["traces/exit"].shape == (3,)
        w.append([monitored_record(3)])
    with open_store(path) as store:
        assert verify_store(store) == [] and store.n_traces == 4
        assert_same_scores(store.trace(3), monitored_record(3))


def test_a_store_appended_without_its_monitor_scores_is_refused_on_reopen(tmp_path):
    """A store whose monitor dataset is shorter than the commit (an older tribunal appended to it) is not
    silently padded: the writer refuses it and verify names it."""
    import h5py

    path = tmp_path / "s.h5"
    with StoreWriter(path, **monitored_kwargs()) as w:
        w.append([monitored_record(i) for i in range(3)])
    with h5py.File(path, "r+") as f:
        f["monitor/token_score"].resize((5,))
        f["traces/exit"].resize((2,))
    with pytest.raises(StoreError, match="monitor/token_score has 5 rows, fewer than the"):
        StoreWriter(path, **monitored_kwargs()).open()
    with open_store(path) as store:
        problems = verify_store(store)
    assert any("/monitor/token_score has 5 rows" in p for p in problems), problems
    assert any("/traces/exit has 2 rows" in p for p in problems), problems


# -- a full disk ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs, to be filled: a real ENOSPC (tests run as root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()}); needs root, as CI has")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_leaving(disk, free: int):
    """A file that leaves about `free` bytes free on the disk; delete it to free the space again."""
    import os

    stat = os.statvfs(disk)
    filler = disk / "fill"
    filler.write_bytes(b"x" * (stat.f_bavail * stat.f_frsize - free))
    return filler


CREATE_ON_FULL_DISK = """
import sys
from tribunal.store import StoreWriter
from tribunal.errors import StoreError
if sys.argv[2] == "no-precheck":  # as if another process filled the disk after the check
    StoreWriter._ensure_create_space = lambda self: None
try:
    StoreWriter(sys.argv[1], model_id="m", layers=list(range(20)), d_model=64, dtype="float16").open()
except StoreError as exc:
    print("ERROR", exc, flush=True)
    import os
    os._exit(3)  # HDF5's state after ENOSPC is broken; do not let its teardown muddle the test
"""


@pytest.mark.parametrize("precheck", ["precheck", "no-precheck"])
@pytest.mark.parametrize("free", [4096, 12288, 20000])
def test_disk_full_while_creating_leaves_nothing_behind(small_disk, python_env, precheck, free):
    filler = fill_leaving(small_disk, free)
    store = small_disk / "s.h5"
    done = subprocess.run([sys.executable, "-c", CREATE_ON_FULL_DISK, str(store), precheck], env=python_env,
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert done.returncode == 3 and len(lines) == 1, done.stdout + done.stderr
    assert "disk" in lines[0] or "No space" in lines[0], lines[0]
    assert sorted(p.name for p in small_disk.iterdir()) == ["fill"]  # no STORE.creating, no STORE.lock
    filler.unlink()
    with StoreWriter(store, **writer_kwargs()) as w:  # the next run is not blocked
        w.append([make_record(0)])


def test_disk_full_through_the_cli_is_one_line_and_leaves_no_folder(small_disk):
    fill_leaving(small_disk, 8192)
    result = CliRunner().invoke(main, ["synth", str(small_disk / "new" / "run" / "s.h5"), "--quiet", "--traces", "4",
                                       "--problems", "2"])
    lines = [line for line in result.output.splitlines() if line]
    assert result.exit_code == 1 and len(lines) == 1 and "disk full" in lines[0], result.output
    assert sorted(p.name for p in small_disk.iterdir()) == ["fill"]


def test_disk_full_keeps_the_last_commit_and_resumes(small_disk):
    path = small_disk / "s.h5"
    filler = fill_leaving(small_disk, 4 << 20)
    kwargs = writer_kwargs(layers=(2, 5), d_model=256)
    n = 0
    with pytest.raises(StoreError, match="free disk space, then rerun to resume") as info:
        with StoreWriter(path, **kwargs) as w:
            while True:
                w.append([make_record(i, layers=(2, 5), d_model=256, tokens=60) for i in range(n, n + 2)])
                n = w.n_traces
    assert "intact up to its last commit" in str(info.value)
    with open_store(path) as s:  # valid up to the last commit, read-only, before any repair
        assert s.n_traces == n and verify_store(s) == []
    filler.unlink()
    with StoreWriter(path, **kwargs) as w:  # resumes once space is freed
        assert w.n_traces == n
        w.append([make_record(i, layers=(2, 5), d_model=256, tokens=60) for i in range(n, n + 2)])
    with open_store(path) as s:
        assert s.n_traces == n + 2 and verify_store(s) == []


# -- kill -9 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sigkill_at_random_moments(tmp_path, python_env, dtype):
    """kill -9 a real writer process, round after round; every round the store reads, and the next open
    repairs it with no manual step and resumes."""
    rounds = 25 if dtype == "float16" else 10
    path = tmp_path / "crash.h5"
    rng = random.Random(1234)
    committed, repaired_rounds = 0, 0
    for _ in range(rounds):
        proc = run_writer(path, python_env, dtype)
        opened = ""
        if rng.random() < 0.25:  # anywhere: during interpreter start, the open and its repair, or mid-append
            time.sleep(rng.uniform(0.05, 1.6))
        else:  # mid-append, once the writer is past its open, however slowly a loaded machine starts it
            opened = proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        out = opened + out
        assert proc.returncode == -signal.SIGKILL, err
        printed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        if "repairs=" in out and "repairs=0" not in out:
            repaired_rounds += 1
        if not path.exists() or path.stat().st_size == 0:
            continue  # killed before the file was created
        # readable read-only, before any repair, with everything that was reported committed
        committed = check_store(path, max(printed, default=committed))
    # the next open for append repairs with no manual step and resumes
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


def test_kill_while_reopening_leaves_a_readable_store(tmp_path, python_env):
    """The reopen window: a writer killed after opening an existing store, while it checks the identity.

    Opened plainly for write, the superblock would say "open for write, not SWMR", which SWMR readers
    refuse; the writer opens straight into SWMR-write mode, so readers still open the store.
    """
    path = tmp_path / "reopen.h5"
    with StoreWriter(path, **crash_writer_kwargs()) as w:
        w.append([crash_record(i) for i in range(3)])
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2])\n"
        "from store.killed_writers import crash_writer_kwargs\n"
        "from tribunal.store import StoreWriter\n"
        "from tribunal.store import format as fmt\n"
        "fmt.StoreIdentity.differences = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # while checking\n"
        "StoreWriter(sys.argv[1], **crash_writer_kwargs()).open()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT / "tests")], env=python_env,
                          capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert read_status(path)["flags"] != 0  # it really died holding the file
    assert check_store(path, 3) == 3  # read-only, no repair


def test_sigkill_keeps_monitor_scores_and_exit_records_with_their_traces(tmp_path, python_env):
    """A few kill -9 rounds mid-append of a store with monitor scores and exit records: every round the
    committed traces carry exactly their scores and records (verify checks them all), and the next open
    truncates /monitor/* and /traces/exit with the rest, then resumes."""
    path = tmp_path / "crash.h5"
    rng = random.Random(99)
    committed = 0
    for _ in range(5):
        proc = run_writer(path, python_env, monitored=True)
        opened = proc.stdout.readline()
        assert opened.startswith("opened"), proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        printed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        committed = check_store(path, max(printed, default=committed), monitored=True)
    with StoreWriter(path, **crash_writer_kwargs(monitored=True)) as w:
        assert w.n_traces == committed
        w.append([crash_record(i, monitored=True) for i in range(committed, committed + 2)])
    assert check_store(path, committed + 2, monitored=True) == committed + 2
