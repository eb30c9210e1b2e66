"""tribunal merge: one self-contained file that reads like the shards; incompatible shards refused."""

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_record, writer_kwargs
from tribunal.cli import main
from tribunal.store import StoreWriter, open_store
from tribunal.store.verify import verify_store

from .monitored import FIELDS, assert_same_scores, monitored_kwargs, monitored_record


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


def test_merge_carries_monitor_scores_and_exit_records(tmp_path):
    for s in range(2):
        with StoreWriter(tmp_path / f"shard_{s}.h5", **monitored_kwargs()) as w:
            w.append([monitored_record(i) for i in range(s * 4, s * 4 + 4)])
    out = tmp_path / "merged.h5"
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "shard_*.h5"), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    with open_store(out) as merged:
        assert merged.monitor_fields == FIELDS and merged.n_traces == 8 and verify_store(merged) == []
        for i in range(8):
            assert_same_scores(merged.trace(i), monitored_record(i))


def test_incompatible_shards_are_refused(tmp_path):
    shard(tmp_path / "a.h5", range(0, 3))
    shard(tmp_path / "b.h5", range(3, 6), layers=(2, 6))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "-o", str(tmp_path / "m.h5")])
    assert result.exit_code == 1 and "layers: store has [2, 5], asked [2, 6]" in result.output
    shard(tmp_path / "c.h5", range(0, 3))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "a.h5"), str(tmp_path / "c.h5"), "-o", str(tmp_path / "m.h5")])
    assert result.exit_code == 1 and "in more than one shard" in result.output
    assert not (tmp_path / "m.h5").exists()


MERGE_PEAK = """
import sys
from pathlib import Path
from tribunal.store.merge import merge_stores
def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
base = kib("VmRSS:")
merge_stores([sys.argv[1]], sys.argv[2], progress=False, memory_bytes=int(sys.argv[3]))
print((kib("VmHWM:") - base) * 1024)
"""


def test_merge_memory_is_a_byte_budget_flat_across_widths(tmp_path, python_env):
    """Batches are sized in bytes: a 16 MB budget holds at d_model 256 and at 2048 (the old 64Ki-token
    batches took the whole 100 MB store at 2048: 122 MB above the start)."""
    import subprocess
    import sys

    from tribunal.traces.synthetic import SynthSettings, write_synthetic_store

    budget, peaks = 16 << 20, {}
    for width in (256, 2048):
        src = tmp_path / f"w{width}.h5"
        write_synthetic_store(src, SynthSettings(traces=40, problems=10, layers=(1, 2, 3, 4), d_model=width,
                                                 tokens_per_trace=(150, 150), seed=1), progress=False)
        done = subprocess.run([sys.executable, "-c", MERGE_PEAK, str(src), str(tmp_path / f"m{width}.h5"), str(budget)],
                              env=python_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        peaks[width] = int(done.stdout.split()[-1])
        with open_store(tmp_path / f"m{width}.h5") as merged:
            assert merged.n_traces == 40 and merged.n_tokens == 6000
    from tribunal.store.format import default_chunk_tokens

    for width, peak in peaks.items():  # the budget, plus the writer's one chunk buffer per layer (<= 4 MiB each)
        tails = 4 * default_chunk_tokens(width, "float16") * width * 2
        assert peak < budget + tails + (20 << 20), (peaks, width, tails)


def test_a_merge_of_some_problems_copies_only_theirs_and_says_which(tmp_path):
    """`run --validate` splits a run into two stores of disjoint problems: each holds exactly its problems' traces
    and finished problems, passes verify, and records what subset it is."""
    from tribunal.errors import StoreError
    from tribunal.store.merge import merge_stores

    shard(tmp_path / "run.h5", range(12))  # problems 0..3, three traces each (make_record's problem is i // 3)
    result = merge_stores(tmp_path / "run.h5", tmp_path / "some.h5", progress=False, problems={1, 3},
                          subset="problems 1 and 3")
    assert result["traces"] == 6
    with open_store(tmp_path / "some.h5") as some, open_store(tmp_path / "run.h5") as run:
        assert sorted(set(some.table["problem_id"].tolist())) == [1, 3] and verify_store(some) == []
        assert {p for p, _ in some.problems_done()} == {1, 3} and some.attrs["subset"] == "problems 1 and 3"
        source = {(t.problem_id, t.sample_index): t.text for t in map(run.trace, range(run.n_traces))}
        assert all(source[(t.problem_id, t.sample_index)] == t.text for t in map(some.trace, range(some.n_traces)))
    with pytest.raises(StoreError, match="needs a `subset`"):
        merge_stores(tmp_path / "run.h5", tmp_path / "other.h5", progress=False, problems={0})
