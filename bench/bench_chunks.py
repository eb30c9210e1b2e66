"""The chunk probe's store pass against a plain numpy memmap read of the same rows.

The chunk probe reads, per layer, the residual at every chunk's last token. The baseline is the plain way:
each layer's rows in a .npy file opened as a numpy memmap, and one fancy-index gather of the same rows.
Warm page cache, interleaved rounds (the order alternating), medians; the machine's load is printed beside them.

    python bench/bench_chunks.py [--traces 400] [--d-model 2048] [--rounds 5]

Target (issue 12): the chunk pass at most 1.5x the baseline's time.
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

from common import export_layers_to_npy, machine_load, print_table, timed  # noqa: E402

from tribunal.probes.chunk_probe import chunk_features, load_chunks  # noqa: E402
from tribunal.store import open_store  # noqa: E402
from tribunal.traces.models import piece_decoder  # noqa: E402
from tribunal.traces.synthetic import SynthSettings, write_synthetic_store  # noqa: E402

LAYERS = (4, 8, 12, 16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=400)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="tribunal-bench-chunks-"))
    try:
        path = work / "store.h5"
        write_synthetic_store(path, SynthSettings(traces=args.traces, problems=args.traces // 4, layers=LAYERS,
                                                  d_model=args.d_model, chunk_signal=0.8, chunks_per_trace=(4, 12)),
                              progress=False)
        with open_store(path) as store:
            data = load_chunks(store, piece_decoder(store.model_id))
            table = store.table
            rows = (table["token_start"][data.trace].astype(np.int64)
                    + table["prompt_length"][data.trace].astype(np.int64) + data.token_end)
            npys = export_layers_to_npy(store, LAYERS, work)
            size = store.n_tokens * args.d_model * 2 * len(LAYERS)
            mine = chunk_features(store, LAYERS[0], data)
            np.testing.assert_array_equal(mine, np.load(npys[0], mmap_mode="r")[rows].astype(np.float32))

        def baseline():
            for p in npys:
                np.asarray(np.load(p, mmap_mode="r")[rows], dtype=np.float32)

        def tribunal_pass():
            with open_store(path) as s:
                for layer in LAYERS:
                    chunk_features(s, layer, data)

        baseline()
        tribunal_pass()  # warm the page cache for both
        times = {"plain numpy memmap gather": [], "tribunal chunk pass": []}
        for r in range(args.rounds):
            order = [("plain numpy memmap gather", baseline), ("tribunal chunk pass", tribunal_pass)]
            for name, fn in order if r % 2 == 0 else reversed(order):
                times[name].append(timed(fn))
        wall = {name: statistics.median(w for w, _ in ts) for name, ts in times.items()}
        cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
        base = "plain numpy memmap gather"
        print(f"# chunk pass: {len(data.y)} chunks of {args.traces} traces, {len(LAYERS)} layers x {args.d_model} fp16, "
              f"store {size / 1e9:.2f} GB, warm page cache, {args.rounds} rounds; {machine_load()}")
        print_table(None, ["method", "median s", "x baseline time", "median CPU s", "x baseline CPU"],
                    [(name, f"{wall[name]:.3f}", f"{wall[name] / wall[base]:.2f}", f"{cpu[name]:.3f}",
                      f"{cpu[name] / cpu[base]:.2f}") for name in times])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
