"""Probe benchmarks on a store of a few GB.

    python bench/bench_probes.py [--gb 2.4] [--rounds 3] [--memory 512M]

1. Trajectory features (every layer x 5 aggregations, the probe's only read of
   the store) against numpy memmap reading the same bytes and doing the same
   reductions, interleaved rounds, medians, warm page cache.
2. Peak RSS of `tribunal probe tokens --memory M` on a store at least 4x M,
   in a fresh process.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PRINT_OWN_PEAK_RSS, export_layers_to_npy, own_peak_rss_bytes  # noqa: E402

from tribunal.probes.trajectory import load_trajectory_data  # noqa: E402
from tribunal.store import open_store  # noqa: E402
from tribunal.store.reader import AGGREGATIONS, reduce_blocks  # noqa: E402
from tribunal.traces.synthetic import SynthSettings, write_synthetic_store  # noqa: E402

LAYERS = (8, 12, 16, 20)
D_MODEL = 2048


def memmap_baseline(npys, table, offsets, rows):
    t0 = time.perf_counter()
    for p in npys:
        mm = np.load(p, mmap_mode="r")
        reduce_blocks(((0, s, mm[s : s + rows]) for s in range(0, mm.shape[0], rows)), table, offsets, D_MODEL,
                      AGGREGATIONS, 10)
    return time.perf_counter() - t0


def tribunal_features(path):
    t0 = time.perf_counter()
    with open_store(path) as store:
        load_trajectory_data(store)
    return time.perf_counter() - t0


def token_probe_peak_rss(path, out, memory):
    code = ("import sys\nfrom tribunal.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass" + PRINT_OWN_PEAK_RSS)
    args = ["probe", "tokens", str(path), "--out", str(out), "--memory", memory, "--bootstrap", "100"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return own_peak_rss_bytes(done.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="tribunal-bench-probes-"))
    try:
        per_token = len(LAYERS) * D_MODEL * 2
        traces = int(args.gb * 1e9 / per_token / 600)
        path = work / "store.h5"
        write_synthetic_store(path, SynthSettings(traces=traces - traces % 4, problems=(traces - traces % 4) // 4,
                                                  layers=LAYERS, d_model=D_MODEL, tokens_per_trace=(200, 1000)),
                              progress=False)
        with open_store(path) as store:
            nbytes = store.n_tokens * per_token
            npys = export_layers_to_npy(store, LAYERS, work)
            table, offsets, rows = store.table, store.trace_offsets, store.block_rows()
        print(f"# probe benchmark: store of {nbytes / 1e9:.2f} GB ({len(LAYERS)} layers x {D_MODEL} fp16, "
              f"{traces} traces), {args.rounds} rounds, warm page cache")
        base, ours = [], []
        memmap_baseline(npys, table, offsets, rows)  # warm the cache
        for r in range(args.rounds):
            if r % 2:
                ours.append(tribunal_features(path))
                base.append(memmap_baseline(npys, table, offsets, rows))
            else:
                base.append(memmap_baseline(npys, table, offsets, rows))
                ours.append(tribunal_features(path))
        b, o = statistics.median(base), statistics.median(ours)
        print("\n### Trajectory features: every layer x 5 aggregations in one pass per layer\n")
        print("| reader | seconds (median) | GB/s | time vs memmap |")
        print("|---|---|---|---|")
        print(f"| numpy memmap, same reductions | {b:.2f} | {nbytes / b / 1e9:.2f} | 1.00 |")
        print(f"| tribunal load_trajectory_data | {o:.2f} | {nbytes / o / 1e9:.2f} | {o / b:.2f} |")
        for p in npys:
            p.unlink()
        budget = args.memory
        rss = token_probe_peak_rss(path, work / "tok", budget)
        limit = int(float(budget[:-1]) * {"M": 1 << 20, "G": 1 << 30}[budget[-1]])
        print("\n### Per-token probe memory\n")
        print("| store size | --memory | store / memory | peak RSS | under budget |")
        print("|---|---|---|---|---|")
        print(f"| {path.stat().st_size / 1e9:.2f} GB | {budget} | {path.stat().st_size / limit:.1f}x | "
              f"{rss / 2**20:.0f} MB | {'yes' if rss <= limit else 'NO'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
