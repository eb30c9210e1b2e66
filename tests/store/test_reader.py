"""Reading stores (tribunal/store/reader.py): shards as one store, live reading, one-pass aggregates, the
rows read straight from the file, and refusals that say what to do."""

import json
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT, make_record, writer_kwargs
from tribunal.cli import main
from tribunal.errors import IncompatibleStoreError, StoreError
from tribunal.store import StoreWriter, open_store
from tribunal.store import format as fmt
from tribunal.store import reader
from tribunal.store.verify import verify_store

from .cli_output import one_line_error
from .killed_writers import run_writer, wait_for_commit
from .monitored import FIELDS, assert_same_scores, monitored_kwargs, monitored_record

AGGS = ("mean", "last", "last_k", "max", "mean_all")


def test_missing_path(tmp_path):
    one_line_error(["inspect", str(tmp_path / "nope.h5")], "does not exist")
    one_line_error(["verify", str(tmp_path / "nope*.h5")], "no store files match")


def test_not_hdf5_and_zero_length(tmp_path):
    (tmp_path / "notes.h5").write_text("hello")
    (tmp_path / "zero.h5").write_bytes(b"")
    one_line_error(["inspect", str(tmp_path / "notes.h5")], "not an HDF5 file")
    one_line_error(["verify", str(tmp_path / "zero.h5")], "empty (0 bytes)")


def test_layer_not_in_store(good_store):
    with open_store(good_store) as s:
        with pytest.raises(StoreError, match=r"layer\(s\) \[3\] are not in the store; it has layers \[2, 5\]"):
            s.aggregate(3)
        with pytest.raises(StoreError, match="layer 3 is not in"):
            s.activations(3, 0)


def test_reader_works_beside_the_users_own_h5py_handle(good_store):
    for flags in ({}, {"swmr": True}, {"locking": False}):
        with h5py.File(good_store, "r", **flags) as mine:
            with open_store(good_store) as store:
                assert store.n_traces == 6 and store.activations(5, 0).shape[1] == 16
            assert mine["commit"][0] == 6  # the user's handle still works


def test_shards_read_as_one_store(tmp_path):
    for s in range(3):
        with StoreWriter(tmp_path / f"shard{s}.h5", **writer_kwargs()) as w:
            w.append([make_record(i) for i in range(s * 6, s * 6 + 6)])
    with open_store(str(tmp_path / "shard*.h5")) as store:
        assert store.n_traces == 18 and len(store.shards) == 3
        assert store.trace(13).problem_id == 13 // 3
        np.testing.assert_allclose(store.activations(2, 13), make_record(13).activations[0], atol=1e-2)
        blocks = list(store.iter_blocks(2, block_bytes=1))
        assert sum(len(b) for _, _, b in blocks) == store.n_tokens
        assert verify_store(store) == []
    with open_store(tmp_path) as store:  # a run folder
        assert store.n_traces == 18


def test_shards_of_different_models_are_not_mixed(tmp_path):
    with StoreWriter(tmp_path / "a.h5", **writer_kwargs()) as w:
        w.append([make_record(0)])
    with StoreWriter(tmp_path / "b.h5", **writer_kwargs(layers=(2, 6))) as w:
        w.append([make_record(1)])
    with pytest.raises(IncompatibleStoreError, match="layers"):
        open_store([tmp_path / "a.h5", tmp_path / "b.h5"])


def test_shards_beside_their_merge_are_refused(tmp_path):
    for s in range(2):
        with StoreWriter(tmp_path / f"shard_{s}.h5", **writer_kwargs()) as w:
            w.append([make_record(i) for i in range(s * 3, s * 3 + 3)])
    runner = CliRunner()
    assert runner.invoke(main, ["merge", str(tmp_path / "shard_*.h5"), "-o", str(tmp_path / "merged.h5"), "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "more than one shard" in result.output and "merged.h5" in result.output, result.output
    result = runner.invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "more than one shard" in result.output, result.output
    assert runner.invoke(main, ["inspect", str(tmp_path / "shard_*.h5")]).exit_code == 0
    with pytest.raises(Exception, match="read either the shards or the merged file"):
        open_store(tmp_path)


def test_store_repacked_to_the_oldest_format_still_reads(tmp_path):
    if shutil.which("h5repack") is None:
        pytest.skip("h5repack not installed (apt-get install hdf5-tools; .ci/run does)")
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(i) for i in range(4)])
    subprocess.run(["h5repack", str(path), str(tmp_path / "old.h5")], check=True)
    assert (tmp_path / "old.h5").read_bytes()[8] == 0  # superblock version 0
    with open_store(tmp_path / "old.h5") as store:
        assert store.n_traces == 4 and verify_store(store) == []
        np.testing.assert_allclose(store.activations(5, 3), make_record(3).activations[1], atol=1e-2)


def test_live_reader_beside_live_writer(tmp_path, python_env):
    """A reader in this process follows a writer in another, live; inspect shows progress and the live writer."""
    path = tmp_path / "live.h5"
    proc = run_writer(path, python_env, batch=2, pause=0.05)
    try:
        wait_for_commit(proc)
        seen = []
        with open_store(path) as store:
            for _ in range(8):
                store.refresh()
                seen.append(store.n_traces)
                assert verify_store(store, check_values=False) == []
                if store.n_traces:
                    last = store.n_traces - 1
                    assert store.activations(9, last).shape[1] == 64
                time.sleep(0.1)
        assert seen[-1] > seen[0], seen  # progress is visible while the writer runs
        result = CliRunner().invoke(main, ["inspect", "--json", str(path)])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        assert info["writer_live"] is True and info["writers"][0]["holder"]["pid"] == proc.pid
        human = CliRunner().invoke(main, ["inspect", str(path)])
        assert "LIVE" in human.output and str(proc.pid) in human.output
    finally:
        proc.kill()
        proc.communicate()
    info = json.loads(CliRunner().invoke(main, ["inspect", "--json", str(path)]).output)
    assert info["writer_live"] is False


# -- rows and aggregates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,compression", [("float16", None), ("bfloat16", None), ("float32", None),
                                               ("float16", "gzip")])
def test_rows_read_from_the_file_are_hdf5s_rows(tmp_path, dtype, compression):
    """read_rows reads uncompressed chunks straight from the file (os.preadv at each chunk's address): any span,
    across chunk boundaries and into the last, partial chunk, is what HDF5 reads; compressed stores go to HDF5."""
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs(dtype=dtype), compression=compression) as w:  # 32-row chunks
        w.append([make_record(i) for i in range(9)])
    with open_store(path) as store:
        shard = store.shards[0]
        assert (shard._chunk_offsets(5) is None) == (compression is not None)
        expected = shard.dataset(5)[: shard.n_tokens]
        n = shard.n_tokens
        for start, end in [(0, n), (0, 32), (31, 33), (5, 97), (n - 40, n - 1), (n - 1, n), (7, 7)]:
            np.testing.assert_array_equal(shard.read_rows(5, start, end), expected[start:end])
        rows = np.array([0, 31, 32, 64, n - 1])
        np.testing.assert_array_equal(shard.read_scattered(5, rows), expected[rows])
        for i in range(store.n_traces):  # and a trace's float32 values are its words decoded, bit for bit
            start, end = int(store.table["token_start"][i]), int(store.table["token_end"][i])
            values = fmt.decode_activations(expected[start:end], dtype).astype(np.float32)
            assert store.activations(5, i).tobytes() == values.tobytes()
        with pytest.raises(StoreError, match="outside the committed"):
            shard.read_rows(5, 0, n + 1)


def test_float16_words_decode_as_numpys_cast_bit_for_bit():
    """Store.aggregate decodes float16 by a vectorized rebias, not numpy's cast: every one of the 65,536 words
    must come out as numpy casts it, through the fast path (finite words) and the fallback (inf and NaN)."""
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    decode = reader._decoder("float16")
    assert decode is reader._float16_rebiased_into  # not numpy's cast: this CPU does not flush subnormals
    finite = np.isfinite(words).all(axis=1)
    assert finite.sum() == 248  # rows 124..127 and 252..255 hold the inf and NaN words
    for rows in (words[finite], words[~finite], words):
        out = decode(rows, np.empty(rows.shape, np.float32))
        assert out.tobytes() == rows.astype(np.float32).tobytes()
    bf16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out = reader._decoder("bfloat16")(bf16, np.empty(bf16.shape, np.float32))
    assert out.tobytes() == (bf16.astype(np.uint32) << 16).tobytes()


def test_aggregates_match_direct_computation(tmp_path):
    path = tmp_path / "s.h5"
    recs = [make_record(i, prompt=3) for i in range(12)]
    recs.append(make_record(12, tokens=3, prompt=3))  # no generated token
    with StoreWriter(path, **writer_kwargs(dtype="float32")) as w:
        w.append(recs)
    with open_store(path) as store:
        # tiny blocks, so traces straddle block boundaries
        agg = store.aggregate(5, AGGS, k=4, block_bytes=32 * 16 * 4)
        for i, rec in enumerate(recs):
            x = rec.activations[1]
            gen = x[3:] if rec.n_tokens > 3 else x[-1:]
            np.testing.assert_allclose(agg["mean"][i], gen.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(agg["max"][i], gen.max(0), rtol=1e-6)
            np.testing.assert_allclose(agg["last"][i], x[-1], rtol=1e-6)
            np.testing.assert_allclose(agg["last_k"][i], gen[-4:].mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(agg["mean_all"][i], x.mean(0), rtol=1e-5, atol=1e-5)
        with pytest.raises(StoreError, match=r"layer\(s\) \[7\] are not in the store"):
            store.aggregate(7)


@pytest.mark.parametrize("threads,piece_rows", [(1, None), (2, None), (2, 3)])
def test_float16_aggregates_are_numpys_arithmetic_bit_for_bit(tmp_path, monkeypatch, threads, piece_rows):
    """In one block, each aggregate is numpy's float32 cast of the stored words summed per segment (prompt,
    generated before the last k, last k), whichever thread reduces which segment, and however many pieces
    a segment is decoded and reduced in."""
    monkeypatch.setattr(reader, "REDUCE_THREADS", threads)
    if piece_rows:
        monkeypatch.setattr(reader, "PIECE_BYTES", piece_rows * 4 * 64)
    path = tmp_path / "s.h5"
    recs = [make_record(i, prompt=3, d_model=64) for i in range(30)] + [make_record(30, tokens=3, prompt=3, d_model=64)]
    with StoreWriter(path, **writer_kwargs(d_model=64)) as w:
        w.append(recs)
    k = 4
    with open_store(path) as store:
        agg = store.aggregate(5, AGGS, k=k)
        for i in range(store.n_traces):
            start, end = int(store.table["token_start"][i]), int(store.table["token_end"][i])
            x = store.shards[0].dataset(5)[start:end].astype(np.float32)
            gen = min(3, len(x) - 1)
            tail = max(gen, len(x) - k)
            prompt, early, final = x[:gen].sum(0), x[gen:tail].sum(0), x[tail:].sum(0)
            expected = {"mean": (early + final) / (len(x) - gen), "mean_all": (prompt + early + final) / len(x),
                        "last_k": final / (len(x) - tail), "max": x[gen:].max(0), "last": x[-1]}
            for name in AGGS:
                assert agg[name][i].tobytes() == np.asarray(expected[name], np.float32).tobytes(), (i, name)


# -- monitor scores and exit records ------------------------------------------------------------------------


def test_monitor_scores_and_exit_records_read_across_shards(tmp_path):
    for s in range(2):
        with StoreWriter(tmp_path / f"shard{s}.h5", **monitored_kwargs()) as w:
            w.append([monitored_record(i) for i in range(s * 5, s * 5 + 5)])
    with open_store(str(tmp_path / "shard*.h5")) as store:
        assert store.monitor_fields == FIELDS
        assert len(store.exit_table) == len(store.table) == 10  # aligned with the table, shard after shard
        for i in range(10):
            rec = monitored_record(i)
            assert_same_scores(store.trace(i), rec)
            assert store.exit_table[i]["thinking_tokens"] == rec.exit["thinking_tokens"]
    with StoreWriter(tmp_path / "plain.h5", **writer_kwargs()) as w:
        w.append([make_record(20)])
    with StoreWriter(tmp_path / "no_exit.h5", **writer_kwargs(monitor_fields=FIELDS)) as w:
        w.append([monitored_record(21, exit=False)])
    with pytest.raises(IncompatibleStoreError, match=r"monitor fields: store has \['chunk_probability', "
                                                     r"'token_score'\], asked \[\]; exit table: store has one"):
        open_store([tmp_path / "shard0.h5", tmp_path / "plain.h5"])
    with pytest.raises(IncompatibleStoreError, match="exit table: store has one, asked none") as info:
        open_store([tmp_path / "shard0.h5", tmp_path / "no_exit.h5"])
    assert "monitor fields" not in str(info.value)


OLD_READER = """
import sys
import numpy as np
import tribunal
from tribunal.store import open_store
from tribunal.store.summary import format_trace, summarize
from tribunal.store.verify import verify_store
assert tribunal.__file__.startswith(sys.argv[1]), tribunal.__file__  # the old tribunal, not this checkout's
with open_store(sys.argv[2]) as store:
    assert verify_store(store) == [], verify_store(store)
    summarize(store), format_trace(store, 1)
    out = {"table": store.table.tobytes(), "n_tokens": np.array(store.n_tokens)}
    for i in range(store.n_traces):
        t = store.trace(i)
        for name in ("token_ids", "is_generated", "logprobs", "entropies"):
            out[f"{i}_{name}"] = getattr(t, name)
        out[f"{i}_text"] = np.frombuffer(t.text.encode(), np.uint8)
        for layer in store.layers:
            out[f"{i}_layer{layer}"] = store.activations(layer, i)
np.savez(sys.argv[3], **out)
"""
# The store code before monitor scores and exit records existed (the parent of the commit that added them).
BEFORE_MONITOR = "6f3685fd9150b067cede422fecfccce09d675bde"


def test_a_reader_from_before_monitor_scores_reads_a_store_with_them(tmp_path, python_env):
    """The reader, verify and inspect of the tribunal before /monitor and /traces/exit, run on a store that has
    them: they read every trace (table, tokens, text, activations) as this reader does, and find nothing wrong."""
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_MONITOR, "tribunal"], capture_output=True)
    if archive.returncode:
        pytest.skip(f"not a git checkout with commit {BEFORE_MONITOR[:12]}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    path = tmp_path / "s.h5"
    with StoreWriter(path, **monitored_kwargs()) as w:
        w.append([monitored_record(i) for i in range(4)])
        w.append([monitored_record(i) for i in range(4, 7)])
    env = dict(python_env, PYTHONPATH=str(old))
    done = subprocess.run([sys.executable, "-c", OLD_READER, str(old), str(path), str(tmp_path / "old.npz")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = np.load(tmp_path / "old.npz")
    with open_store(path) as store:
        assert seen["table"].tobytes() == store.table.tobytes() and int(seen["n_tokens"]) == store.n_tokens
        for i in range(store.n_traces):
            t = store.trace(i)
            for name in ("token_ids", "is_generated", "logprobs", "entropies"):
                assert seen[f"{i}_{name}"].tobytes() == getattr(t, name).tobytes(), (i, name)
            assert seen[f"{i}_text"].tobytes() == t.text.encode()
            for layer in store.layers:
                assert seen[f"{i}_layer{layer}"].tobytes() == store.activations(layer, i).tobytes()


def test_interventions_name_each_steered_shard(tmp_path):
    """A store sampled under an intervention (tribunal steer's arms) says so; an unsteered one lists none."""
    steered, plain = tmp_path / "steered.h5", tmp_path / "plain.h5"
    how = {"arm": "direction_a+4", "kind": "add", "layer": 2, "alpha": 4.0}
    with StoreWriter(steered, **writer_kwargs(generation_settings={"temperature": 1.0, "intervention": how})) as w:
        w.append([make_record(0)])
    with StoreWriter(plain, **writer_kwargs(generation_settings={"temperature": 1.0})) as w:
        w.append([make_record(1)])
    with open_store(steered) as store:
        assert store.interventions == [(str(steered), how)]
    with open_store(plain) as store:
        assert store.interventions == []
    with open_store([str(steered), str(plain)]) as store:
        assert [path for path, _ in store.interventions] == [str(steered)]
