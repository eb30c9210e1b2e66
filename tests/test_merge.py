"""tribunal merge: one self-contained file that reads like the shards; incompatible shards refused."""

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_record, writer_kwargs
from tribunal.cli import main
from tribunal.store import StoreWriter, open_store
from tribunal.store.verify import verify_store


def shard(path, indices, **kw):
    with StoreWriter(path, **writer_kwargs(**kw)) as w:
        w.append([make_record(i, **({"layers": kw["layers"]} if "layers" in kw else {})) for i in indices],
                 problems_done=sorted({(i // 3, 3) for i in indices}))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_copies_every_trace_and_survives_moving_the_shards(tmp_path, dtype):
    for s in range(3):
        shard(tmp_path / f"shard_{s}.h5", range(s * 6, s * 6 + 6), dtype=dtype)
    out = tmp_path / "merged.h5"
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "shard_*.h5"), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    with open_store(str(tmp_path / "shard_*.h5")) as shards, open_store(out) as merged:
        assert merged.n_traces == shards.n_traces == 18 and verify_store(merged) == []
        for i in range(18):
            np.testing.assert_array_equal(merged.activations(5, i), shards.activations(5, i))
            assert merged.trace(i).text == shards.trace(i).text
        words = merged.shards[0].file["activations/layer_002"][:5]
        assert words.dtype == shards.shards[0].file["activations/layer_002"].dtype
    for s in range(3):
        (tmp_path / f"shard_{s}.h5").unlink()
    with open_store(out) as merged:  # a copy: independent of the shards
        assert merged.n_traces == 18 and len(merged.shards[0].file["problems"]) == 6


def test_incompatible_shards_are_refused(tmp_path):
    shard(tmp_path / "a.h5", range(0, 3))
    shard(tmp_path / "b.h5", range(3, 6), layers=(2, 6))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "-o", str(tmp_path / "m.h5")])
    assert result.exit_code == 1 and "layers: store has [2, 5], asked [2, 6]" in result.output
    shard(tmp_path / "c.h5", range(0, 3))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "a.h5"), str(tmp_path / "c.h5"), "-o", str(tmp_path / "m.h5")])
    assert result.exit_code == 1 and "in more than one shard" in result.output
    assert not (tmp_path / "m.h5").exists()
