"""Writer and reader on real HDF5 files: what goes in comes out, across dtypes, shards and reopenings."""

import json
import subprocess

import h5py
import numpy as np
import pytest

from conftest import make_record, writer_kwargs
from tribunal.errors import IncompatibleStoreError, StoreError, StoreLockedError
from tribunal.store import StoreWriter, open_store
from tribunal.store import format as fmt
from tribunal.store.verify import verify_store


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


def test_bfloat16_words_kept_bit_for_bit(tmp_path):
    words = np.random.default_rng(0).integers(0x3000, 0x4000, (2, 10, 16)).astype(np.uint16)
    rec = make_record(0, tokens=10)
    rec.activations = words
    with StoreWriter(tmp_path / "s.h5", **writer_kwargs(dtype="bfloat16")) as w:
        w.append([rec])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["activations/layer_005"][:], words[1])
        assert f["activations/layer_005"].attrs["encoding"] == "bfloat16-bits-in-uint16"
    with open_store(tmp_path / "s.h5") as store:
        expected = (words[1].astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(store.activations(5, 0), expected)


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


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(0)])
        with pytest.raises(StoreLockedError, match=r"pid \d+ on host"):
            StoreWriter(path, **writer_kwargs()).open()
        # another process is refused the same way
        code = (
            "import sys; from tribunal.store import StoreWriter\n"
            "try:\n StoreWriter(sys.argv[1], model_id='test/model', layers=(2,5), d_model=16).open()\n"
            "except Exception as e: print(type(e).__name__, e)"
        )
        out = subprocess.run(["python", "-c", code, str(path)], capture_output=True, text=True).stdout
        assert "StoreLockedError" in out and f"pid {__import__('os').getpid()}" in out


def test_aggregates_match_direct_computation(tmp_path):
    path = tmp_path / "s.h5"
    recs = [make_record(i, prompt=3) for i in range(12)]
    recs.append(make_record(12, tokens=3, prompt=3))  # no generated token
    with StoreWriter(path, **writer_kwargs(dtype="float32")) as w:
        w.append(recs)
    with open_store(path) as store:
        # tiny blocks, so traces straddle block boundaries
        agg = store.aggregate(5, ("mean", "last", "last_k", "max", "mean_all"), k=4, block_bytes=32 * 16 * 4)
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


def test_file_explains_itself(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs(), generation_settings={"temperature": 1.0}, dataset_id="gsm8k") as w:
        w.append([make_record(0)])
    with h5py.File(path, "r") as f:
        for attr in fmt.REQUIRED_ATTRS:
            assert attr in f.attrs, attr
        assert json.loads(f.attrs["generation_settings"]) == {"temperature": 1.0}
        assert "description" in f["traces/table"].attrs
        assert h5py.check_enum_dtype(f["traces/table"].dtype["label"]) == fmt.LABEL_CODES
        assert list(f["commit"].attrs["fields"]) == list(fmt.COMMIT_FIELDS)
    dump = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True)
    if dump.returncode == 0:  # hdf5-tools installed (CI installs it)
        assert '"correct"' in dump.stdout and "activations" in dump.stdout


def test_store_repacked_to_the_oldest_format_still_reads(tmp_path):
    import shutil

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
