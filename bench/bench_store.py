"""Store benchmarks: append rate, bytes on disk, chunk shape, compression (aggregate reads: bench_aggregate.py).

Disks here are noisy, so every figure is a ratio against baselines run in the
same process, interleaved, repeated (--rounds, default 3) and reported as
medians. Run:  python bench/bench_store.py [--gb 1.5] [--rounds 3] [--dir /tmp]
Results go to stdout as tables; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import drop_cache, machine_load, print_table  # noqa: E402

from tribunal.store import StoreWriter, TraceRecord, open_store  # noqa: E402

LAYERS = (8, 12, 16, 20)
D_MODEL = 3584


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def make_batches(total_bytes, batch_tokens=1000, seed=0):
    """Trace-sized batches of real-looking activations (heavy-tailed, per-dimension scale), fp16."""
    rng = np.random.default_rng(seed)
    per_token = len(LAYERS) * D_MODEL * 2
    n_batches = max(1, int(total_bytes // (per_token * batch_tokens)))
    scale = rng.lognormal(0, 1, D_MODEL).astype(np.float32)
    base = (rng.standard_t(5, (len(LAYERS), batch_tokens, D_MODEL)).astype(np.float32) * scale).astype(np.float16)
    return n_batches, base


def records_for(batch_index, base, prompt=100):
    n = base.shape[1]
    return [TraceRecord(problem_id=batch_index, sample_index=0, token_ids=np.zeros(n, np.int32), prompt_length=prompt,
                        activations=base, label="correct", text="x" * 2000,
                        logprobs=np.zeros(n - prompt), entropies=np.zeros(n - prompt))]


def bench_tribunal(path, n_batches, base, chunk_tokens=None, compression=None, per_batch=None, durable=False):
    t0 = time.perf_counter()
    with StoreWriter(path, model_id="bench", layers=LAYERS, d_model=D_MODEL, chunk_tokens=chunk_tokens,
                     compression=compression, durable=durable) as w:
        for b in range(n_batches):
            tb = time.perf_counter()
            w.append(records_for(b, base))
            if per_batch is not None:
                per_batch.append(time.perf_counter() - tb)
    fsync_path(path)
    return time.perf_counter() - t0


def bench_oswrite(path, n_batches, base, per_batch=None, fsync_each=False):
    """The disk's sequential limit: large-block os.write of the same bytes, then fsync (or fsync per batch)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(n_batches):
        tb = time.perf_counter()
        for layer in range(base.shape[0]):
            os.write(fd, memoryview(base[layer]).cast("B"))
        if fsync_each:  # durable per batch, like a durable commit
            os.fsync(fd)
        if per_batch is not None:
            per_batch.append(time.perf_counter() - tb)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def bench_arrow(path, n_batches, base):
    """A peer's best path: datasets' ArrowWriter fed whole batches as fixed-size-list columns."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    t0 = time.perf_counter()
    with ArrowWriter(path=str(path)) as writer:
        for _ in range(n_batches):
            cols = {f"layer_{l}": pa.FixedSizeListArray.from_arrays(pa.array(base[i].reshape(-1)), D_MODEL)
                    for i, l in enumerate(LAYERS)}
            writer.write_table(pa.table(cols))
        writer.finalize()
    fsync_path(path)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.5, help="store size per write, GB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--drift-gb", type=float, default=3.0, help="size of the store used for first/last 10%% rates")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="tribunal-bench-"))
    try:
        n_batches, base = make_batches(args.gb * 1e9)
        nbytes = n_batches * base.nbytes
        print(f"# store benchmark: {len(LAYERS)} layers x {D_MODEL} fp16, {n_batches} batches of "
              f"{base.shape[1]} tokens = {nbytes / 1e9:.2f} GB per write, {args.rounds} rounds, in {work}; {machine_load()}")

        # -- append ---------------------------------------------------------------------------
        methods = {
            "os.write, one fsync at the end": (bench_oswrite, {}),
            "tribunal StoreWriter(durable=False)": (bench_tribunal, {}),
            "datasets ArrowWriter, fsync at the end": (bench_arrow, {}),
            "os.write, fsync per batch": (bench_oswrite, {"fsync_each": True}),
            "tribunal StoreWriter(durable=True), fsync per commit": (bench_tribunal, {"durable": True}),
        }
        times = {name: [] for name in methods}
        for r in range(args.rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for name in order:
                fn, kw = methods[name]
                path = work / f"append_{r}_{list(methods).index(name)}"
                times[name].append(fn(path, n_batches, base, **kw))
                path.unlink()
        rows = []
        for name, ts in times.items():
            limit = statistics.median(times["os.write, fsync per batch" if "per" in name else "os.write, one fsync at the end"])
            med = statistics.median(ts)
            rows.append((name, f"{nbytes / med / 1e6:.0f}", f"{limit / med:.2f}"))
        print_table("Append (median MB/s; ratio to os.write with the same fsync policy, same run)",
                    ["writer", "MB/s", "x disk limit"], rows)

        # -- chunk shape ---------------------------------------------------------------------------
        rows = []
        small = max(1, n_batches // 3)
        for chunk in (32, 128, 512):
            app, trace_read = [], []
            for r in range(args.rounds):
                path = work / f"chunk_{chunk}.h5"
                oss = bench_oswrite(work / "os.bin", small, base)
                app.append(bench_tribunal(path, small, base, chunk_tokens=chunk) / oss)
                drop_cache(path)
                t0 = time.perf_counter()
                with open_store(path) as store:
                    for i in range(store.n_traces):
                        store.activations(LAYERS[1], i)
                trace_read.append(time.perf_counter() - t0)
                path.unlink()
            rows.append((chunk, f"{chunk * D_MODEL * 2 / 1024:.0f} KB", f"{1 / statistics.median(app):.2f}",
                         f"{small * base.shape[1] * D_MODEL * 2 / statistics.median(trace_read) / 1e6:.0f}"))
        print_table("Chunk rows (tokens per chunk): append vs os.write, cold per-trace read of one layer",
                    ["chunk rows", "chunk size", "append x disk limit", "trace read MB/s"], rows)

        # -- compression -------------------------------------------------------------------------
        rows = []
        for comp in (None, "lzf", "gzip"):
            path = work / f"comp_{comp}.h5"
            oss = bench_oswrite(work / "os.bin", small, base)
            t = bench_tribunal(path, small, base, compression=comp)
            rows.append((comp or "none", f"{path.stat().st_size / (small * base.nbytes):.3f}", f"{oss / t:.2f}"))
            path.unlink()
        print_table("Optional compression on heavy-tailed fp16 activations",
                    ["compression", "size / raw", "append x disk limit"], rows)

        # -- drift over a multi-GB store, interleaved with the disk baseline batch by batch -------------
        drift_batches, _ = make_batches(args.drift_gb * 1e9)
        path, raw = work / "drift.h5", work / "drift.bin"
        ratios = []
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with StoreWriter(path, model_id="bench", layers=LAYERS, d_model=D_MODEL, durable=False) as w:
            for i in range(drift_batches):
                t0 = time.perf_counter()
                w.append(records_for(i, base))
                t1 = time.perf_counter()
                for layer in range(base.shape[0]):
                    os.write(fd, memoryview(base[layer]).cast("B"))
                ratios.append((time.perf_counter() - t1) / (t1 - t0))
        os.close(fd)
        size = path.stat().st_size
        tenth = max(1, drift_batches // 10)
        first, last = statistics.median(ratios[:tenth]), statistics.median(ratios[-tenth:])
        print_table(f"Append rate across a {drift_batches * base.nbytes / 1e9:.1f} GB store, each batch beside an "
                    "os.write batch of the same bytes (rate as x disk limit at that moment)",
                    ["first 10%", "last 10%", "last / first"], [(f"{first:.2f}", f"{last:.2f}", f"{last / first:.2f}")])
        print_table(f"Bytes on disk ({drift_batches * base.nbytes / 1e9:.1f} GB store, fp16, no compression)",
                    ["bytes/token/layer", "x d_model*2"],
                    [(f"{size / (drift_batches * base.shape[1]) / len(LAYERS):.0f}", f"{size / (drift_batches * base.nbytes):.4f}")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
