"""Live monitor and early exit: what `--monitor` costs while sampling, and what `--exit-policy` saves.

    python bench/bench_monitor.py [--rounds 12] [--problems 16] [--samples 4] [--probe-problems 40]

Setup: a full run of the embedded model on the first --probe-problems embedded problems (keep_all), then
`probe chunks` and `probe tokens` on it (as `tribunal run` calls them), so the probes folder holds the
chunk and token directions and the `auto` exit thresholds. The runs timed below sample --problems other
embedded problems (the ones after the probing problems, as a local dataset), so the exits act on problems
the probes never saw.

1. Monitor overhead: generated tokens per second of `--monitor PROBES` against the same run without it
   (same problems, seeds, batch size), each round running both back to back (order alternating), each run
   in a fresh interpreter (see bench_generate.py for why), rate = the summary's new_tokens / seconds
   (sampling, the model load excluded). The figure is the median over rounds of each round's own ratio,
   with a bootstrap 95% interval of that median.
2. Early exit measured: the same problems with `--exit-policy PROBES` for each rule (probe, confidence),
   threshold (auto, --fixed-threshold) and answer (intermediate, forced), paired with the first round's
   full run by `tribunal exit-report`'s library function: total generated tokens (forced answers included)
   and accuracy against the full run's, with problem-bootstrap CIs, and wall seconds of sampling against
   the full runs' median.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_load, print_table  # noqa: E402

RULES = ("probe", "confidence")
ANSWERS = ("intermediate", "forced")


def run_one(config: dict) -> dict:
    """One generation in this interpreter; what the parent needs from its summary."""
    from tribunal.traces.generate import GenerateConfig, run_generation

    summary = run_generation(GenerateConfig(progress=False, keep_all=True, **config))
    if summary["status"] != "done":
        raise SystemExit(f"generation stopped: {summary['status']}")
    return {k: summary[k] for k in ("new_tokens", "seconds", "traces", "tokens", "labels")}


def run_fresh(config: dict, threads: int) -> dict:
    """run_one in a fresh interpreter (malloc state and caches do not carry over between the variants), with
    `threads` compute threads (0: the libraries' default). A refused run returns {"refused": its one line}."""
    env = dict(os.environ)
    if threads:
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        refused = [x for x in done.stderr.splitlines() if x.startswith("tribunal.errors.TribunalError: ")]
        if refused:
            return {"refused": refused[-1].split(": ", 1)[1]}
        raise SystemExit(f"a run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def ratio_interval(base: list[float], other: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Median over rounds of other/base, with a bootstrap 95% interval of that median (as bench_generate)."""
    ratios = [o / b for b, o in zip(base, other)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples)]


def setup(work: Path, args) -> tuple[Path, Path]:
    """The probing run and its probes folder; the held-out problems as a local dataset."""
    from tribunal.probes.run import probe_chunks, probe_tokens
    from tribunal.problems.loading import load_problems
    from tribunal.store import open_store
    from tribunal.traces.models import piece_decoder

    store, probes = work / "probing.h5", work / "probes"
    t0 = time.perf_counter()
    s = run_fresh(dict(out=str(store), max_problems=args.probe_problems, samples_per_problem=args.samples,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens), args.threads)
    print(f"setup: probing run {s['traces']} traces, {s['labels']}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with open_store(store) as opened:
        decoder = piece_decoder(opened.model_id)
    t0 = time.perf_counter()
    chunks = probe_chunks(store, probes, decoder, progress=False, permutations=args.permutations)
    tokens = probe_tokens(store, probes, progress=False)
    print(f"setup: probes in {time.perf_counter() - t0:.0f} s; exit thresholds "
          f"{chunks['document']['chunk'].get('exit_thresholds')}; token layer {tokens['document']['token']['layer']}",
          file=sys.stderr)
    held_out = load_problems(None)[args.probe_problems : args.probe_problems + args.problems]
    if len(held_out) < args.problems:
        raise SystemExit(f"the embedded problems run out: --probe-problems + --problems > {args.probe_problems + len(held_out)}")
    dataset = work / "held_out.jsonl"
    dataset.write_text("".join(json.dumps({"question": p.question, "answer": f"#### {p.gold}"}) + "\n"
                               for p in held_out))
    return probes, dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--problems", type=int, default=16, help="problems of each timed run (held out from the probes)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--probe-problems", type=int, default=40, help="problems of the probing run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--permutations", type=int, default=5, help="probe chunks' permutation test (small: not timed)")
    ap.add_argument("--fixed-threshold", default="0.5", help="the number threshold beside auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads of each run (0: torch's default; on a shared 2-core machine two threads "
                         "spin against other work and swing a run's speed several-fold)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one run's GenerateConfig (JSON), in a fresh interpreter
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    from tribunal.report.exit_report import exit_report
    from tribunal.store import open_store
    from tribunal.traces.models import piece_decoder

    work = Path(tempfile.mkdtemp(prefix="tribunal-bench-monitor-"))
    print(f"work folder {work}; {machine_load()} at the start", file=sys.stderr)
    probes, dataset = setup(work, args)
    common = dict(dataset=str(dataset), max_problems=args.problems, samples_per_problem=args.samples,
                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    loads = [machine_load()]

    runs = {"full": [], "monitor": []}
    for r in range(args.rounds):
        for variant in (("full", "monitor") if r % 2 == 0 else ("monitor", "full")):
            out = work / f"{variant}{r}.h5"
            extra = {"monitor": str(probes)} if variant == "monitor" else {}
            runs[variant].append(run_fresh({**common, "out": str(out), **extra}, args.threads))
            got = runs[variant][-1]
            print(f"round {r + 1}/{args.rounds} {variant}: {got['new_tokens'] / got['seconds']:.0f} tok/s "
                  f"({got['new_tokens']} tokens)", file=sys.stderr, flush=True)
            if r > 0 or variant == "monitor":
                out.unlink()
        if runs["full"][-1]["new_tokens"] != runs["monitor"][-1]["new_tokens"]:
            print(f"round {r + 1}: the monitored run generated {runs['monitor'][-1]['new_tokens']} tokens, the plain "
                  f"one {runs['full'][-1]['new_tokens']}", file=sys.stderr)
    loads.append(machine_load())
    rate = {v: [x["new_tokens"] / x["seconds"] for x in runs[v]] for v in runs}
    mid, lo, hi = ratio_interval(rate["full"], rate["monitor"])
    full_store = work / "full0.h5"
    print_table(f"Monitor overhead (embedded model, {args.problems} held-out problems x {args.samples} samples, "
                f"batch {args.batch_size}, max {args.max_new_tokens} new tokens, {args.rounds} rounds)",
                ["run", "generated tok/s (median)", "x the run without monitor (median of per-round ratios)",
                 "bootstrap 95% interval"],
                [["without monitor", f"{statistics.median(rate['full']):.0f}", "1", "-"],
                 ["`--monitor PROBES`", f"{statistics.median(rate['monitor']):.0f}", f"**{mid:.3f}**",
                  f"[{lo:.3f}, {hi:.3f}]"]])
    print(f"\nTarget >= 0.95x: {'met' if lo >= 0.95 else 'median met, interval reaches below' if mid >= 0.95 else 'missed'}"
          f" (median {mid:.3f}, interval [{lo:.3f}, {hi:.3f}]); same tokens in every round: "
          f"{all(a['new_tokens'] == b['new_tokens'] for a, b in zip(runs['full'], runs['monitor']))}.")
    print(f"\nLoad: {loads[0]} before the rounds, {loads[1]} after.")

    full_seconds = statistics.median(x["seconds"] for x in runs["full"])
    policies = [(rule, threshold, answer) for rule in RULES for threshold in ("auto", args.fixed_threshold)
                for answer in ANSWERS]
    ran, exited, seconds, refused = [], [], [], []
    for i, (rule, threshold, answer) in enumerate(policies):
        out = work / f"exit{i}.h5"
        got = run_fresh({**common, "out": str(out), "exit_policy": str(probes), "exit_rule": rule,
                         "exit_threshold": threshold, "exit_answer": answer}, args.threads)
        if "refused" in got:
            refused.append(f"{rule}, {threshold}, {answer}: {got['refused']}")
            print(f"exit {refused[-1]}", file=sys.stderr, flush=True)
            continue
        ran.append((rule, threshold, answer))
        exited.append(out)
        seconds.append(got["seconds"])
        print(f"exit {rule} {threshold} {answer}: {got['new_tokens']} tokens in {got['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    loads.append(machine_load())
    with open_store(full_store) as opened:
        decoder = piece_decoder(opened.model_id)
    report = exit_report(full_store, exited, work / "exit_report", decoder) if exited else {"policies": []}
    rows = []
    for (rule, threshold, answer), policy, sec in zip(ran, report["policies"], seconds):
        m = policy["measured"]
        tau = policy["threshold"]
        lo_s, hi_s = m["tokens_saved_ci"]
        lo_a, hi_a = m["accuracy_change_ci"]
        rows.append([rule, threshold if threshold != "auto" else f"auto ({'never' if tau is None else f'{tau:.3f}'})",
                     answer, f"{m['exited']}/{m['pairs']}",
                     f"{m['exited_tokens']:,} / {m['full_tokens']:,}",
                     f"**{m['exited_tokens'] / m['full_tokens']:.3f}** [{1 - hi_s:.3f}, {1 - lo_s:.3f}]",
                     f"{m['forced_tokens']:,}", f"{sec / full_seconds:.2f}",
                     f"{100 * m['full_accuracy']:.1f}% -> {100 * m['exited_accuracy']:.1f}%",
                     f"**{100 * m['accuracy_change']:+.1f}** [{100 * lo_a:+.1f}, {100 * hi_a:+.1f}]",
                     f"{100 * m['prefix']['share']:.0f}%"])
    print_table(f"Early exit against the full run (same {args.problems} held-out problems x {args.samples} samples "
                "and seeds)",
                ["rule", "threshold", "answer", "traces exited", "generated tokens, exit / full",
                 "x full tokens [95% CI]", "forced-answer tokens", "x full wall s", "accuracy full -> exit",
                 "accuracy change, points [95% CI]", "prefix of the full twin"], rows)
    for line in refused:
        print(f"\nRefused ({line}).")
    print(f"\nWall s: the exit run's sampling seconds over the median of the {args.rounds} full runs' "
          f"({full_seconds:.1f} s). Load: {loads[2]} after the exit runs.")
    for p in sorted(work.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    work.rmdir()


if __name__ == "__main__":
    main()
