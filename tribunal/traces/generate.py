"""`tribunal generate`: sample and grade traces, stream activations of every target layer into a store.

The loop: take the shard's problems, skip what the store already holds, sample
batches of (problem, sample) pairs, grade them, and hand finished traces to the
store's writer process (store_process.py) through a bounded queue, so the model
never waits on the disk and memory stays bounded when the disk is slow. A stop
signal (SIGUSR1, SIGTERM, SIGINT) drops the batch in flight, commits what is
queued, closes the store and returns INTERRUPTED; rerunning the same command
resumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import parse_budget
from ..errors import TribunalError
from ..grading import grade_with_answer, prompt_opens_thinking
from ..problems.loading import build_prompt, dataset_identity, load_problems, shard_problems
from ..store.writer import TraceRecord
from .settings import GenerateConfig
from .stop import EXIT_INTERRUPTED, GracefulStop
from .store_process import WriterProcess

__all__ = ["EXIT_INTERRUPTED", "GenerateConfig", "run_generation", "format_summary"]

log = logging.getLogger("tribunal.generate")


def _store_dtype(requested: str, model) -> str:
    """auto: bfloat16 words when the model computes in bf16 (lossless), float16 otherwise."""
    if requested != "auto":
        return requested
    import torch

    return "bfloat16" if model.dtype == torch.bfloat16 else "float16"


def run_generation(config: GenerateConfig) -> dict:
    """Generate into config.out; returns a summary with 'status' = 'done' or 'interrupted'.

    Stop signals are caught from the first line: a preemption while a large model is still loading
    ends the run as 'interrupted' (resumable) too, before the store is touched.
    """
    with GracefulStop() as stop:
        return _run_generation(config, stop)


@dataclass
class _Run:
    """What a generation run holds while it samples: its problems, the model, and the running counts."""

    config: GenerateConfig
    stop: GracefulStop
    mine: list
    target: dict
    model: object
    tokenizer: object
    layers: list
    store_dtype: str
    eos_ids: set
    prompts: dict = field(default_factory=dict)
    thinking: dict = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    remaining: Counter = field(default_factory=Counter)
    graded: Counter = field(default_factory=Counter)  # labels of every trace graded in this run, stored or not
    new_tokens: int = 0
    vllm: object = None  # --engine vllm: the vLLM engine that samples (the model above captures)
    per_trace_seeds: bool = True
    notes: dict = field(default_factory=dict)  # what the engine measured, for the summary

    def prompt(self, problem) -> list[int]:
        """The problem's prompt ids; grading reads thinking from the rendered prompt (R1 templates end with <think>)."""
        if problem.problem_id not in self.prompts:
            ids = build_prompt(self.tokenizer, problem.question, self.config.prompt_template, self.config.chat_template)
            self.prompts[problem.problem_id] = ids
            self.thinking[problem.problem_id] = prompt_opens_thinking(
                self.tokenizer.decode(ids, skip_special_tokens=False))
        return self.prompts[problem.problem_id]


def _run_generation(config: GenerateConfig, stop: GracefulStop) -> dict:
    config.validate()
    run = _load(config, stop)
    if stop():  # stopped while the model loaded: nothing was touched
        return _summary("interrupted", stop, config, len(run.mine), layers=[], targets_met=False)
    writes = WriterProcess(_writer_kwargs(run), config.queue_batches)
    held = writes.open()
    status, started = "done", time.time()
    try:  # from here on the writer process is told to close the store, whatever happens
        if config.engine == "vllm":
            from .vllm_engine import sample_with_vllm

            status = sample_with_vllm(run, held, writes, started)
        else:
            status = _sample_all(run, held, writes, started)
    finally:
        held = writes.finish()
    return {**_summary(status, stop, config, len(run.mine), layers=run.layers,
                       targets_met=targets_met(Counter(held["labels"]), run.target), held=held,
                       seconds=time.time() - started, new_tokens=run.new_tokens), **run.notes}


def _load(config: GenerateConfig, stop: GracefulStop) -> _Run:
    """The shard's problems and the model (the slow part: a stop signal meanwhile is honoured after it)."""
    from .models import decoder_blocks, load_model, resolve_layers

    shard, num_shards = config.shard_pair()
    mine = shard_problems(load_problems(config.dataset, config.split), shard, num_shards, config.max_problems)
    target = {"correct": math.ceil(config.target_correct / num_shards),
              "incorrect": math.ceil(config.target_incorrect / num_shards)}
    model, tokenizer = load_model(config.model, revision=config.revision, compute_dtype=config.compute_dtype,
                                  device_map=config.device_map, trust_remote_code=config.trust_remote_code)
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    eos_ids.discard(None)
    run = _Run(config=config, stop=stop, mine=mine, target=target, model=model, tokenizer=tokenizer,
               layers=resolve_layers(config.layers, len(decoder_blocks(model))),
               store_dtype=_store_dtype(config.dtype, model), eos_ids=eos_ids)
    if config.engine == "vllm" and not stop():
        from .vllm_engine import runs_on_cpu, start_engine

        positions = getattr(model.config, "max_position_embeddings", None) or math.inf
        longest = max((len(run.prompt(p)) for p in mine), default=1)
        # the longest sequence rounded up to a power of two (runs of like settings share an engine in a process)
        need = 1 << (longest + config.max_new_tokens - 1).bit_length()
        run.vllm = start_engine(config, model, tokenizer, int(min(positions, need)))
        run.per_trace_seeds = not runs_on_cpu()
    return run


def _writer_kwargs(run: _Run) -> dict:
    """The store this run writes: identity (model, layers, settings that must match to resume) and provenance."""
    from .models import model_identity

    config = run.config
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "queue_batches")}
    if config.engine == "hf":
        del settings["vllm_memory"]
    if run.mine:  # the store records whether the prompt opens thinking (grading reads it per prompt)
        run.prompt(run.mine[0])
    settings["prompt_opens_thinking"] = bool(run.mine) and run.thinking[run.mine[0].problem_id]
    settings.update(layers_resolved=run.layers, store_dtype=run.store_dtype, targets_per_shard=run.target,
                    compute_dtype_resolved=str(run.model.dtype).replace("torch.", ""), per_trace_seeds=run.per_trace_seeds)
    if config.engine == "vllm":
        import vllm

        settings.update(vllm_version=vllm.__version__, captured_by="teacher forcing (transformers)")
    resume_identity = {k: settings[k] for k in ("split", "temperature", "top_p", "max_new_tokens",
                                                "samples_per_problem", "seed", "shard", "prompt_template",
                                                "chat_template", "max_problems", "keep_all")}
    resume_identity["dataset"] = dataset_identity(config.dataset, config.split)
    if config.engine != "hf":  # an hf store's identity is as it was before engines, so those stores still resume
        resume_identity["engine"] = config.engine
    model_id, revision = model_identity(run.model, config.model)
    return dict(
        path=config.out, model_id=model_id, model_revision=revision, layers=run.layers,
        d_model=int(run.model.config.hidden_size), dtype=run.store_dtype, generation_settings=settings,
        dataset_id=str(config.dataset or "tribunal/embedded-problems"), dataset_split=config.split,
        seed=config.seed, resume_identity=resume_identity, durable=config.durable,
        description="Per-token residual-stream activations of chain-of-thought traces sampled by tribunal generate.",
    )


def _sample_all(run: _Run, held: dict, writes: WriterProcess, started: float) -> str:
    """Sample, grade and hand over batches until the targets are met, the pairs run out or a stop comes."""
    import torch

    from .models import decoder_blocks
    from .sampling import (HF_CAPTURE_BYTES, BlockCapture, CaptureBudget, Interrupted, SamplingSettings, sample_batch,
                           trace_seed)

    config = run.config
    budget = CaptureBudget(parse_budget(config.capture_memory) or HF_CAPTURE_BYTES, len(run.layers),
                           int(run.model.config.hidden_size), run.store_dtype, config.max_new_tokens, config.queue_batches)
    capture = BlockCapture(decoder_blocks(run.model), run.layers, max_bytes=budget.batch_bytes)
    sampling = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens)
    pairs = pairs_to_sample(run, held)
    bar = progress_bar(config, len(run.mine), len(held["problems_done"]))
    batch_size, i = config.batch_size, 0
    try:
        while i < len(pairs):
            if targets_met(run.counts, run.target) and not config.keep_all:
                return "done"
            if run.stop():
                return "interrupted"
            chunk = pairs[i : i + batch_size]
            chunk = chunk[: budget.traces_per_batch([len(run.prompt(p)) for p, _ in chunk])]
            seeds = [trace_seed(config.seed, p.problem_id, s) for p, s in chunk]
            try:
                sampled = sample_batch(run.model, capture, [run.prompt(p) for p, _ in chunk], seeds, sampling,
                                       run.eos_ids, run.tokenizer.pad_token_id, run.store_dtype, should_stop=run.stop)
            except Interrupted:
                return "interrupted"
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise TribunalError("out of memory with --batch-size 1: use a smaller --max-new-tokens, "
                                        "fewer --layers, or more GPUs (--device-map auto)") from None
                batch_size = max(1, batch_size // 2)
                log.warning("CUDA out of memory: halving the batch to %d and retrying", batch_size)
                capture.release()
                torch.cuda.empty_cache()
                continue
            records, finished_problems = grade(run, chunk, sampled, seeds)
            writes.put(records, finished_problems, sampled[0].ready)
            i += len(chunk)
            bar.update(len(finished_problems))
            bar.set_postfix_str(postfix(run.counts, run.new_tokens, started, config.out))
        return "done"
    finally:
        capture.remove()
        bar.close()


def pairs_to_sample(run: _Run, held: dict) -> list:
    """The (problem, sample) pairs still to sample: the shard's problems not done, samples not stored. Counts
    each problem's pairs (run.remaining), so a problem is marked done once its last pair is graded, in any order."""
    config = run.config
    run.counts, tried, done_pairs = Counter(held["labels"]), set(held["problems_done"]), held["done_keys"]
    if held["n_traces"] or tried:
        log.info("resuming %s: %d traces committed (%s), %d problems done%s", config.out, held["n_traces"],
                 ", ".join(f"{k} {v}" for k, v in sorted(run.counts.items())), len(tried),
                 f"; repaired: {'; '.join(held['repairs'])}" if held["repairs"] else "")
    pairs = [(p, s) for p in run.mine if p.problem_id not in tried
             for s in range(config.samples_per_problem) if (p.problem_id, s) not in done_pairs]
    run.remaining = Counter(p.problem_id for p, _ in pairs)
    return pairs


def grade(run: _Run, chunk, sampled, seeds) -> tuple[list, list]:
    """Grade sampled traces: the records to store (a label past its target is not stored, unless --keep-all),
    and the problems whose last pair this batch held."""
    config, records, finished_problems = run.config, [], []
    for (p, s), t, seed in zip(chunk, sampled, seeds):
        text = run.tokenizer.decode([x for x in t.generated_ids if x not in run.eos_ids], skip_special_tokens=False)
        label, predicted = grade_with_answer(text, p.gold, finished=t.finished, thinking=run.thinking[p.problem_id])
        run.graded[label] += 1
        run.new_tokens += len(t.generated_ids)
        if config.keep_all or label not in run.target or run.counts[label] < run.target[label]:
            run.counts[label] += 1
            records.append(TraceRecord(
                problem_id=p.problem_id, sample_index=s, token_ids=t.prompt_ids + t.generated_ids,
                prompt_length=len(t.prompt_ids), activations=t.activations, label=label, text=text,
                predicted=predicted, gold=p.gold, finish_reason="stop" if t.finished else "length",
                logprobs=t.logprobs, entropies=t.entropies, seed=seed))
        run.remaining[p.problem_id] -= 1
        if not run.remaining[p.problem_id]:
            finished_problems.append((p.problem_id, config.samples_per_problem))
    return records, finished_problems


def _summary(status, stop, config, problems_in_shard, layers, targets_met, held=None, seconds=0.0, new_tokens=0):
    """What run_generation returns (and `format_summary` prints); held: the store writer's final state."""
    held = held or {}
    return {
        "status": status, "signal": stop.received, "store": str(config.out),
        "problems_tried": len(held.get("problems_done", ())), "problems_in_shard": problems_in_shard,
        "traces": held.get("n_traces", 0), "tokens": held.get("n_tokens", 0),
        "labels": dict(held.get("labels", {})), "layers": layers, "targets_met": targets_met,
        "seconds": seconds, "new_tokens": new_tokens, "repairs": held.get("repairs", []),
        "writer_peak_rss_mb": held.get("peak_rss_mb"),
    }


def targets_met(counts: Counter, target: dict) -> bool:
    return all(counts[label] >= n for label, n in target.items())


def progress_bar(config, total, initial):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"generate {config.shard}", unit="problem",
                disable=not config.progress, dynamic_ncols=True)


def postfix(counts, new_tokens, started, store_path) -> str:
    rate = new_tokens / max(time.time() - started, 1e-9)
    try:
        size = Path(store_path).stat().st_size / 1e6
    except OSError:
        size = float("nan")
    return (f"correct {counts['correct']} incorrect {counts['incorrect']} unparsed {counts['unparsed']} "
            f"| {rate:.0f} tok/s | {size:.1f} MB")


def format_summary(summary: dict) -> str:
    labels = summary["labels"]
    return (f"{summary['status']}: {summary['store']}: {summary['traces']} traces "
            f"(correct {labels.get('correct', 0)}, incorrect {labels.get('incorrect', 0)}, "
            f"unparsed {labels.get('unparsed', 0)}), {summary['tokens']} tokens, "
            f"{summary['problems_tried']}/{summary['problems_in_shard']} problems tried, "
            f"{summary['new_tokens'] / max(summary['seconds'], 1e-9):.0f} new tok/s"
            + (f"; stopped by {summary['signal']}, rerun the same command to resume" if summary["status"] == "interrupted" else ""))
