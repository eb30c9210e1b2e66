"""Probe benchmark on a store of a few GB: peak RSS of `tribunal probe tokens --memory M` on a store at least
4x M, in a fresh process. (The trajectory probe's read of the store is timed in bench_aggregate.py, against the
plain numpy way.)

    python bench/bench_probes.py [--gb 2.4] [--memory 512M]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PRINT_OWN_PEAK_RSS, own_peak_rss_bytes  # noqa: E402

from tribunal.config import parse_size  # noqa: E402
from tribunal.store import open_store  # noqa: E402
from tribunal.traces.synthetic import SynthSettings, write_synthetic_store  # noqa: E402

LAYERS = (8, 12, 16, 20)
D_MODEL = 2048


def token_probe_peak_rss(path, out, memory):
    code = ("import sys\nfrom tribunal.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass" + PRINT_OWN_PEAK_RSS)
    args = ["probe", "tokens", str(path), "--out", str(out), "--memory", memory]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return own_peak_rss_bytes(done.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.4)
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
        print(f"# probe benchmark: store of {nbytes / 1e9:.2f} GB ({len(LAYERS)} layers x {D_MODEL} fp16, "
              f"{traces} traces)")
        budget = args.memory
        rss = token_probe_peak_rss(path, work / "tok", budget)
        limit = parse_size(budget)
        print("\n### Per-token probe memory\n")
        print("| store size | --memory | store / memory | peak RSS | under budget |")
        print("|---|---|---|---|---|")
        print(f"| {path.stat().st_size / 1e9:.2f} GB | {budget} | {path.stat().st_size / limit:.1f}x | "
              f"{rss / 2**20:.0f} MB | {'yes' if rss <= limit else 'NO'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
