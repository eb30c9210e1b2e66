"""The vLLM engine against plain vLLM and the hf engine; `tribunal capture` against a plain forward.

    python bench/bench_vllm.py                       # this CPU: the embedded model, vLLM's CPU build
    python bench/bench_vllm.py --shape 7b            # a GPU: random-init Qwen2 at 7B shapes (also 1.5b)

1. Generated tokens per second over the same prompts and settings, in one process, interleaved over rounds,
   medians: plain vLLM (`LLM.generate` on the prompt ids, logprobs off, nothing stored, vLLM's defaults with
   prefix caching on: what a user of vLLM alone runs), `run_generation(engine="vllm")` with `--capture
   inline` (the layers, log-probs and entropies taken in vLLM's forward, grading, the store) and with
   `--capture forward` (sampling, then teacher forcing), and `run_generation(engine="hf")`. Two vLLM engines
   live through the rounds: plain vLLM and --capture forward share one, started once (its start-up is reported
   on its own); the inline one has the capture worker. Each run_generation loads its model, as a run does. On a GPU the peak
   memory of each path is read from nvidia-smi while it runs (vLLM reserves --vllm-memory of it up front).
2. `tribunal capture` of the vllm store (every trace re-forwarded, the layers written to a new store) in
   tokens per second, against the plain way to forward the same tokens: the same length-sorted batches
   through `model(input_ids, attention_mask)` with no hooks, no log-prob slicing and no store.

On a GPU there are no weights to download: --shape builds a random-init Qwen2 (bf16, vocabulary 151,936)
in a temporary folder, with the embedded model's tokenizer for the prompts. Random weights rarely emit EOS, so every trace runs
to --max-new-tokens on every path (plain vLLM is also given ignore_eos).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_table  # noqa: E402
from tribunal.problems.loading import build_prompt, load_problems  # noqa: E402
from tribunal.traces.generate import GenerateConfig, run_generation  # noqa: E402

SHAPES = {  # Qwen2 shapes (DeepSeek-R1-Distill-Qwen-1.5B and -7B)
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1),  # a dry run of the GPU path on a CPU (head_dim 64: vLLM CPU needs it)
}
VOCAB = 151936


def random_qwen2(shape: str, folder: Path) -> Path:
    """A random-init Qwen2 of `shape` (bf16) saved beside the embedded model's tokenizer (no download). Ids past
    the tokenizer's vocabulary decode to nothing, which only leaves the random model's traces unparsed."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tribunal.traces.models import EMBEDDED_MODEL

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL / name, folder / name)
    return folder


class GpuPeak:
    """The peak of nvidia-smi's used memory while the block runs (MiB); None without a GPU."""

    def __enter__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                used = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                          capture_output=True, text=True, timeout=5).stdout.split()[0])
                self.peak = max(self.peak or 0, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plain_vllm(llm, prompts, args) -> tuple[float, int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens, ignore_eos=args.shape != "embedded")
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def tribunal_run(engine, out: Path, args, model, capture="inline", monitor=None) -> tuple[float, int]:
    out.unlink(missing_ok=True)
    config = GenerateConfig(out=str(out), model=model, engine=engine, capture=capture, monitor=monitor,
                            vllm_memory=args.vllm_memory, vllm_args=args.vllm_args if engine == "vllm" else None,
                            layers=args.layers, max_new_tokens=args.max_new_tokens, max_problems=args.problems,
                            samples_per_problem=args.samples, keep_all=True, batch_size=args.batch_size,
                            capture_memory=args.capture_memory,
                            progress=False, durable=False)
    t0 = time.perf_counter()
    summary = run_generation(config)
    return time.perf_counter() - t0, summary["new_tokens"]


def random_probes(folder: Path, model_id: str, d_model: int, layer: int) -> Path:
    """A probes folder with random unit directions at `layer` (chunk and token), as `probe chunks` and `probe
    tokens` write it: the monitor's cost does not depend on how good its directions are."""
    import numpy as np

    from tribunal.probes.directions import FORMAT, VERSION

    rng = np.random.default_rng(0)
    u, v, m = rng.normal(size=(3, d_model))
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "version": VERSION, "provenance": {"model": model_id, "d_model": d_model, "layers": [layer]},
           "chunk": {"direction": {"layer": layer, "direction": (u / np.linalg.norm(u)).tolist(), "weight_norm": 0.5,
                                   "bias": 0.1}},
           "token": {"layer": layer, "midpoint": m.tolist(),
                     "directions": {"lda": {"direction": (v / np.linalg.norm(v)).tolist()}}}}
    (folder / "implicit_value_directions.json").write_text(json.dumps(doc))
    return folder


def plain_forward(model_path, store_path, capture_memory: str) -> tuple[float, int]:
    """The same traces forwarded in the same length-sorted batches, no hooks, no log-prob slicing, no store."""
    import torch

    from tribunal.store import open_store
    from tribunal.traces.models import load_model
    from tribunal.config import parse_budget
    from tribunal.traces.capture.teacher_forcing import forcer_for, length_batches

    t0 = time.perf_counter()  # like capture: the model's load and the store's reading on the clock
    net, _ = load_model(model_path)
    device = net.get_input_embeddings().weight.device
    with open_store(store_path) as store:
        traces = [store.trace(i).token_ids for i in range(store.n_traces)]
        sizing = forcer_for(net, list(store.layers), 1.0, store.dtype, parse_budget(capture_memory))  # capture's batch budget
    budget_tokens = sizing.budget_tokens
    sizing.remove()
    with torch.no_grad():
        for batch in length_batches([len(t) for t in traces], budget_tokens):
            width = max(len(traces[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, : len(traces[i])] = torch.as_tensor(traces[i].astype("int64"))
                mask[r, : len(traces[i])] = 1
            net(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(len(t) for t in traces)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["embedded", *SHAPES], default="embedded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 embedded, 1024 otherwise")
    ap.add_argument("--layers", default=None, help="layers the tribunal paths capture (default: 3 middle layers)")
    ap.add_argument("--vllm-memory", type=float, default=0.3,
                    help="each of the two engines' share (at 7B on one GPU: 0.3 x 2 plus the forward path's weights)")
    ap.add_argument("--batch-size", type=int, default=16, help="the hf engine's batch")
    ap.add_argument("--capture-memory", default="auto")
    ap.add_argument("--vllm-args", default=None, help="tribunal's --vllm-args for every engine")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the hf engine (slow at 7B)")
    args = ap.parse_args()
    args.max_new_tokens = args.max_new_tokens or (128 if args.shape == "embedded" else 1024)
    work = Path(tempfile.mkdtemp(prefix="tribunal-bench-vllm-"))
    model = None if args.shape == "embedded" else str(random_qwen2(args.shape, work / "model"))

    from tribunal.traces.models import load_model
    from tribunal.traces import vllm_engine
    from tribunal.traces.vllm_engine import start_engine

    net, tokenizer = load_model(model)
    prompts = [build_prompt(tokenizer, p.question) for p in load_problems(None, "test")[: args.problems]
               for _ in range(args.samples)]
    probe = GenerateConfig(out="-", model=model, engine="vllm", capture="forward", vllm_memory=args.vllm_memory,
                           vllm_args=args.vllm_args)
    need = 1 << (max(len(p) for p in prompts) + args.max_new_tokens - 1).bit_length()
    t0 = time.perf_counter()
    llm = start_engine(probe, net, tokenizer, min(need, getattr(net.config, "max_position_embeddings", need)))
    startup = time.perf_counter() - t0
    net_config = net.config
    del net
    if args.layers is None:
        from tribunal.traces.models import resolve_layers

        args.layers = ",".join(str(x) for x in resolve_layers(None, SHAPES.get(args.shape, {}).get("num_hidden_layers", 8))[:3])

    from tribunal.traces.models import recorded_model_id

    probes = random_probes(work / "probes", recorded_model_id(model), int(net_config.hidden_size),
                           int(args.layers.split(",")[0]))
    vllm_engine.ENGINES_KEPT = 2  # sampling only (plain vLLM, --capture forward), and inline (the monitor's layer is stored)
    paths = {"plain vLLM": lambda: plain_vllm(llm, prompts, args),
             "tribunal --capture inline": lambda: tribunal_run("vllm", work / "inline.h5", args, model),
             "tribunal --capture inline --monitor": lambda: tribunal_run("vllm", work / "monitor.h5", args, model,
                                                                         monitor=str(probes)),
             "tribunal --capture forward": lambda: tribunal_run("vllm", work / "vllm.h5", args, model, "forward")}
    if not args.skip_hf:
        paths["tribunal --engine hf"] = lambda: tribunal_run("hf", work / "hf.h5", args, model)
    rates = {name: [] for name in paths}
    peaks = {name: [] for name in paths}
    for capture in ("forward", "inline"):  # warm-up (every engine started): first-call costs off the clock
        tribunal_run("vllm", work / "warm.h5", args, model, capture)
    tribunal_run("vllm", work / "warm.h5", args, model, monitor=str(probes))
    for r in range(args.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            with GpuPeak() as peak:
                seconds, tokens = paths[name]()
            rates[name].append(tokens / seconds)
            peaks[name].append(peak.peak)
            print(f"round {r} {name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s", flush=True)

    base = statistics.median(rates["plain vLLM"])
    rows = []
    for name in paths:
        med = statistics.median(rates[name])
        peak = max((p for p in peaks[name] if p is not None), default=None)
        rows.append((name, f"{med:.0f}", f"{med / base:.2f}", "-" if peak is None else f"{peak / 1024:.1f}"))
    print_table(f"Generated tokens/s, shape {args.shape}, {len(prompts)} traces x up to {args.max_new_tokens} new "
                f"tokens, layers {args.layers}, medians of {args.rounds} rounds (vLLM start-up {startup:.0f} s, once)",
                ["path", "tokens/s", "x plain vLLM", "peak GPU GiB"], rows)

    from tribunal.config import parse_budget
    from tribunal.traces.capture.recapture import recapture_store

    source = work / "vllm.h5"
    capture_rates, plain_rates = [], []
    for r in range(args.rounds):
        out = work / "captured.h5"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        done = recapture_store(source, out, model=model, capture_memory=parse_budget(args.capture_memory), progress=False)
        capture_rates.append(done["tokens"] / (time.perf_counter() - t0))
        seconds, tokens = plain_forward(model, source, args.capture_memory)
        plain_rates.append(tokens / seconds)
    capture, plain = statistics.median(capture_rates), statistics.median(plain_rates)
    print_table(f"tribunal capture of that store ({done['tokens']} tokens, layers {args.layers}), medians of "
                f"{args.rounds} rounds", ["path", "tokens/s", "x plain forward"],
                [("plain forward (no hooks, full logits, no store)", f"{plain:.0f}", "1.00"),
                 ("tribunal capture (hooks, sliced log-probs, store)", f"{capture:.0f}", f"{capture / plain:.2f}")])
    print(json.dumps({"rates": rates, "capture": capture_rates, "plain_forward": plain_rates}))


if __name__ == "__main__":  # vLLM spawns workers: the guard keeps them from re-running the benchmark
    main()
