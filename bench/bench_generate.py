"""Generator benchmarks: capture+store overhead, and peak host memory against the number of traces.

    python bench/bench_generate.py [--rounds 5] [--problems 48]

1. Generated tokens per second with capture and store (the real `run_generation`
   path: hooks, host copies, writer thread, HDF5) against the same generation
   without capture and store (same model, prompts, seeds, batch size; prompt
   building, decoding and grading in both), interleaved rounds, medians. On CPU with the embedded model; pass --model/--device-map on a GPU.
2. Peak RSS of `tribunal generate --keep-all` in a subprocess for N and 10N traces.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tribunal.grading import grade  # noqa: E402
from tribunal.problems.loading import build_prompt, load_problems  # noqa: E402
from tribunal.traces.generate import GenerateConfig, run_generation  # noqa: E402
from tribunal.traces.models import load_model  # noqa: E402
from tribunal.traces.sampling import SamplingSettings, sample_batch, trace_seed  # noqa: E402


def baseline_rate(model_id, device_map, problems, samples, batch_size, max_new):
    """The same generation (prompts, sampling loop, decoding, grading) with no hooks and no store."""
    model, tok = load_model(model_id, device_map=device_map)
    pairs = [(p, s) for p in problems for s in range(samples)]
    eos = {tok.eos_token_id}
    settings = SamplingSettings(1.0, 1.0, max_new)
    t0, n = time.perf_counter(), 0
    prompts = {p.problem_id: build_prompt(tok, p.question) for p in problems}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        out = sample_batch(model, None, [prompts[p.problem_id] for p, _ in chunk],
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


def peak_rss_mb(problems, samples, out):
    """Run the command in a fresh interpreter that reports its own peak RSS."""
    code = ("import sys\nfrom tribunal.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            # VmHWM: this process's own peak. ru_maxrss would include the parent's peak (Linux keeps
            # the high-water mark across fork + exec), i.e. the benchmark's own memory.
            "print('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    args = ["generate", "--out", str(out), "--keep-all", "--quiet", "--max-problems", str(problems),
            "--samples-per-problem", str(samples)]
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("MAXRSS")][-1]
    return int(line.split()[1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--problems", type=int, default=120)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device-map", default=None)
    args = ap.parse_args()
    problems = load_problems(None)[: args.problems]
    work = Path(tempfile.mkdtemp(prefix="tribunal-bench-gen-"))
    base, cap = [], []
    for r in range(args.rounds):
        out = work / f"r{r}.h5"
        if r % 2 == 0:
            base.append(baseline_rate(args.model, args.device_map, problems, args.samples, args.batch_size, args.max_new_tokens))
            cap.append(captured_rate(args.model, args.device_map, problems, args.samples, args.batch_size, args.max_new_tokens, out))
        else:
            cap.append(captured_rate(args.model, args.device_map, problems, args.samples, args.batch_size, args.max_new_tokens, out))
            base.append(baseline_rate(args.model, args.device_map, problems, args.samples, args.batch_size, args.max_new_tokens))
        out.unlink()
    b, c = statistics.median(base), statistics.median(cap)
    print(f"\n### Generation with capture and store vs without ({args.model or 'embedded model'}, "
          f"{args.problems} problems x {args.samples} samples, batch {args.batch_size}, {args.rounds} rounds)\n")
    print("| path | generated tok/s (median) | overhead |")
    print("|---|---|---|")
    print(f"| sampling only | {b:.0f} | - |")
    print(f"| sampling + capture + store | {c:.0f} | {100 * (b - c) / b:+.1f}% |")

    rows = []
    for n in (10, 100):
        rows.append((n, n * 4, f"{peak_rss_mb(n, 4, work / f'm{n}.h5'):.0f}"))
    print("\n### Peak host memory of `tribunal generate --keep-all` (embedded model)\n")
    print("| problems | traces | peak RSS MB |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    for p in work.glob("*"):
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
