"""One-pass aggregates: tribunal's Store.aggregate and the trajectory probe's load, against the plain numpy way.

The baseline is what a good engineer writes without tribunal: each layer's rows in a .npy file opened as a
numpy memmap, and per trace one cast of its rows to float32, then mean / last / last-k mean / max / mean over
all rows (the same five aggregations), in one thread. It shares no code with tribunal. Both read the same
bytes, warm (page cache) and cold (evicted with posix_fadvise), interleaved over --rounds (the order
alternating); medians. The machine's load is printed beside the figures.

    python bench/bench_aggregate.py [--gb 1.5] [--traces 300] [--rounds 5] [--dir /tmp]

Targets (issue 17): Store.aggregate >= 1.0x the baseline's throughput, warm and cold; the trajectory
probe's load (all aggregations of all layers, plus its output-confidence features) <= 1.2x the baseline's time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import drop_cache, export_layers_to_npy, machine_load, print_table, timed  # noqa: E402

from tribunal.probes.trajectory import load_trajectory_data  # noqa: E402
from tribunal.store import StoreWriter, TraceRecord, open_store  # noqa: E402

LAYERS = (8, 12, 16, 20)
D_MODEL = 2048
AGGS = ("mean", "last", "last_k", "max", "mean_all")
K = 10


def build_store(path: Path, total_bytes: float, traces: int, seed: int = 0) -> None:
    """Traces of uneven length (prompt 100 tokens), heavy-tailed fp16 activations, `total_bytes` in all."""
    rng = np.random.default_rng(seed)
    per_token = len(LAYERS) * D_MODEL * 2
    mean_len = max(120, int(total_bytes / per_token / traces))
    lengths = np.clip(rng.gamma(2.0, mean_len / 2.0, traces).astype(int), 110, 8 * mean_len)
    scale = rng.lognormal(0, 1, D_MODEL).astype(np.float32)
    pool = (rng.standard_t(5, (len(LAYERS), int(lengths.max()), D_MODEL)).astype(np.float32) * scale).astype(np.float16)
    with StoreWriter(path, model_id="bench", layers=LAYERS, d_model=D_MODEL, durable=False) as w:
        batch = []
        for i, n in enumerate(lengths.tolist()):
            batch.append(TraceRecord(problem_id=i // 2, sample_index=i % 2, token_ids=np.zeros(n, np.int32),
                                     prompt_length=100, activations=pool[:, :n], label=("correct", "incorrect")[i % 2],
                                     text="", predicted="1", gold="1", finish_reason="stop",
                                     logprobs=-rng.random(n - 100), entropies=rng.random(n - 100), seed=i))
            if len(batch) == 16:
                w.append(batch)
                batch = []
        w.append(batch)


def plain_numpy_aggregates(npy_path: Path, starts, ends, prompt_lengths, k: int) -> dict:
    """The baseline: a memmap, one float32 cast per trace, numpy reductions."""
    mm = np.load(npy_path, mmap_mode="r")
    n = len(starts)
    out = {name: np.empty((n, mm.shape[1]), np.float32) for name in AGGS}
    for t in range(n):
        rows = np.asarray(mm[starts[t] : ends[t]], dtype=np.float32)
        generated = rows[prompt_lengths[t] :] if prompt_lengths[t] < len(rows) else rows[-1:]
        out["mean"][t] = generated.mean(axis=0)
        out["last"][t] = rows[-1]
        out["last_k"][t] = generated[-k:].mean(axis=0)
        out["max"][t] = generated.max(axis=0)
        out["mean_all"][t] = rows.mean(axis=0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.5, help="store size, GB")
    ap.add_argument("--traces", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="tribunal-bench-agg-"))
    try:
        store_path = work / "store.h5"
        build_store(store_path, args.gb * 1e9, args.traces)
        with open_store(store_path) as store:
            table = store.table
            starts, ends = table["token_start"].astype(np.int64), table["token_end"].astype(np.int64)
            prompts = table["prompt_length"].astype(np.int64)
            npys = export_layers_to_npy(store, LAYERS, work)
            nbytes = store.n_tokens * D_MODEL * 2 * len(LAYERS)
            # the two compute the same numbers
            mine = store.aggregate(LAYERS[0], AGGS, K)
            theirs = plain_numpy_aggregates(npys[0], starts, ends, prompts, K)
            for name in AGGS:
                np.testing.assert_allclose(mine[name], theirs[name], rtol=2e-3, atol=2e-3)
        print(f"# aggregate benchmark: {len(LAYERS)} layers x {D_MODEL} fp16, {args.traces} traces, "
              f"{nbytes / 1e9:.2f} GB, {args.rounds} rounds, in {work}; at the start: {machine_load()}")

        def baseline():
            for p in npys:
                plain_numpy_aggregates(p, starts, ends, prompts, K)

        def tribunal_aggregate():
            with open_store(store_path) as s:
                for layer in LAYERS:
                    s.aggregate(layer, AGGS, K)

        def trajectory_load():
            with open_store(store_path) as s:
                load_trajectory_data(s, LAYERS, AGGS, K)

        methods = {"plain numpy memmap": baseline, "tribunal Store.aggregate": tribunal_aggregate,
                   "trajectory probe load": trajectory_load}
        res = {(cache, name): [] for cache in ("cold", "warm") for name in methods}
        for r in range(args.rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for name in order:
                for p in npys + [store_path]:
                    drop_cache(p)
                res[("cold", name)].append(timed(methods[name]))
                res[("warm", name)].append(timed(methods[name]))
        rows = []
        for cache in ("cold", "warm"):
            base = statistics.median(wall for wall, _ in res[(cache, "plain numpy memmap")])
            for name in methods:
                t = statistics.median(wall for wall, _ in res[(cache, name)])
                cpu = statistics.median(c for _, c in res[(cache, name)])
                rows.append((cache, name, f"{t:.2f}", f"{cpu:.2f}", f"{nbytes / t / 1e6:.0f}", f"{base / t:.2f}"))
        print_table(None, ["page cache", "method", "median s", "median CPU s", "MB/s", "x plain numpy throughput"],
                    rows)
        print(f"\nat the end: {machine_load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
