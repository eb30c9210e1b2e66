"""Generator benchmarks: capture+store overhead, and peak host memory against the number of traces.

    python bench/bench_generate.py [--rounds 12] [--problems 48]

1. Generated tokens per second of three paths over the same problems, seeds and
   batch size, each round running all three back to back (order alternating),
   each run in a fresh interpreter (glibc malloc's state, its dynamic mmap
   threshold and heap layout, carries over between runs in one process and moved
   a path's speed by up to 7% depending on what ran before it):
   sampling only (prompts, the decode loop, decoding, grading; no hooks, no
   store), sampling + capture (hooks, the last token's partial forward, host
   copies; no store), and the real `run_generation` path (capture, records,
   writer process, HDF5 commits). The overhead is the median over rounds of each
   round's own ratio, with a bootstrap 95% interval: a shared VM's speed drifts
   by several percent between runs, and pairing within a round cancels the drift.
   On CPU with the embedded model; pass --model/--device-map on a GPU.
2. Peak RSS of `tribunal generate --keep-all` in a subprocess for N and 10N traces.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PRINT_OWN_PEAK_RSS, own_peak_rss_bytes  # noqa: E402
from tribunal.grading import grade  # noqa: E402
from tribunal.problems.loading import build_prompt, load_problems  # noqa: E402
from tribunal.traces.generate import GenerateConfig, run_generation  # noqa: E402
from tribunal.traces.models import decoder_blocks, load_model, resolve_layers  # noqa: E402
from tribunal.traces.capture.hooks import BlockCapture  # noqa: E402
from tribunal.traces.engines.hf import SamplingSettings, sample_batch  # noqa: E402
from tribunal.traces.ledger import trace_seed  # noqa: E402


def sampling_rate(model_id, device_map, problems, samples, batch_size, max_new, capture_layers=False):
    """The generation loop with no store: no hooks at all, or (capture_layers) the default layers captured."""
    model, tok = load_model(model_id, device_map=device_map)
    capture = None
    if capture_layers:
        blocks = decoder_blocks(model)
        capture = BlockCapture(blocks, resolve_layers(None, len(blocks)))
    pairs = [(p, s) for p in problems for s in range(samples)]
    eos = {tok.eos_token_id}
    settings = SamplingSettings(1.0, 1.0, max_new)
    t0, n = time.perf_counter(), 0
    prompts = {p.problem_id: build_prompt(tok, p.question) for p in problems}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        out = sample_batch(model, capture, [prompts[p.problem_id] for p, _ in chunk],
                           [trace_seed(0, p.problem_id, s) for p, s in chunk], settings, eos, tok.pad_token_id)
        for (p, _), t in zip(chunk, out):
            grade(tok.decode([x for x in t.generated_ids if x not in eos]), p.gold, finished=t.finished)
        n += sum(len(t.generated_ids) for t in out)
    return n / (time.perf_counter() - t0)


def captured_rate(model_id, device_map, problems, samples, batch_size, max_new, out):
    summary = run_generation(GenerateConfig(
        out=str(out), model=model_id, device_map=device_map, keep_all=True, max_problems=len(problems),
        samples_per_problem=samples, batch_size=batch_size, max_new_tokens=max_new, progress=False))
    return summary["new_tokens"] / summary["seconds"]


def overhead(base: list[float], other: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Median over rounds of 1 - other/base (as %), with a bootstrap 95% interval of that median."""
    losses = [100 * (1 - o / b) for b, o in zip(base, other)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(losses, k=len(losses))) for _ in range(resamples))
    return statistics.median(losses), medians[int(0.025 * resamples)], medians[int(0.975 * resamples)]


def peak_rss_mb(problems, samples, out) -> tuple[float, float]:
    """Peak RSS (MB) of a generation in a fresh interpreter, and of its store writer process."""
    code = ("from tribunal.traces.generate import GenerateConfig, run_generation\n"
            f"s = run_generation(GenerateConfig(out={str(out)!r}, keep_all=True, progress=False, "
            f"max_problems={problems}, samples_per_problem={samples}))\n"
            "print('WRITER', s['writer_peak_rss_mb'])" + PRINT_OWN_PEAK_RSS)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    writer = [x for x in done.stdout.splitlines() if x.startswith("WRITER")][-1].split()[1]
    return own_peak_rss_bytes(done.stdout) / 2**20, float(writer)


PATHS = {
    "sampling": "sampling only",
    "capture": "sampling + capture (no store)",
    "store": "sampling + capture + store (`run_generation`)",
}


def run_one(path: str, args, out: Path) -> float:
    """Generated tokens per second of one path, in this interpreter."""
    common = (args.model, args.device_map, load_problems(None)[: args.problems], args.samples, args.batch_size,
              args.max_new_tokens)
    if path == "store":
        return captured_rate(*common, out)
    return sampling_rate(*common, capture_layers=path == "capture")


def run_fresh(path: str, argv: list[str], out: Path) -> float:
    done = subprocess.run([sys.executable, __file__, *argv, "--one", path, "--out", str(out)], check=True,
                          capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def print_memory_table(work: Path) -> None:
    rows = []
    for n in (10, 100):
        main_mb, writer_mb = peak_rss_mb(n, 4, work / f"m{n}.h5")
        rows.append((n, n * 4, f"{main_mb:.0f}", f"{writer_mb:.0f}"))
    print("\n### Peak host memory of a generation with `keep_all` (embedded model)\n")
    print("| problems | traces | peak RSS MB, generating process | peak RSS MB, store writer process |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device-map", default=None)
    ap.add_argument("--skip-memory", action="store_true", help="only the overhead table")
    ap.add_argument("--one", choices=list(PATHS), help=argparse.SUPPRESS)  # one run, in a fresh interpreter
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(run_one(args.one, args, Path(args.out)))
        return
    argv = [f"--problems={args.problems}", f"--samples={args.samples}", f"--batch-size={args.batch_size}",
            f"--max-new-tokens={args.max_new_tokens}"]
    argv += [f"--model={args.model}"] if args.model else []
    argv += [f"--device-map={args.device_map}"] if args.device_map else []
    work = Path(tempfile.mkdtemp(prefix="tribunal-bench-gen-"))
    rates = {name: [] for name in PATHS.values()}
    for r in range(args.rounds):
        for path in (list(PATHS) if r % 2 == 0 else list(PATHS)[::-1]):
            rates[PATHS[path]].append(run_fresh(path, argv, work / f"r{r}.h5"))
            print(f"round {r + 1}/{args.rounds} {path}: {rates[PATHS[path]][-1]:.0f} tok/s", file=sys.stderr, flush=True)
        (work / f"r{r}.h5").unlink()
    base = rates[PATHS["sampling"]]
    print(f"\n### Generation with and without capture and store ({args.model or 'embedded model'}, "
          f"{args.problems} problems x {args.samples} samples, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens, {args.rounds} rounds)\n")
    print("| path | generated tok/s (median) | overhead (median of per-round ratios) | bootstrap 95% interval |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        if values is base:
            print(f"| {name} | {statistics.median(values):.0f} | - | - |")
        else:
            mid, lo, hi = overhead(base, values)
            print(f"| {name} | {statistics.median(values):.0f} | {mid:+.1f}% | [{lo:+.1f}%, {hi:+.1f}%] |")

    if not args.skip_memory:
        print_memory_table(work)
    for p in work.glob("*"):
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
