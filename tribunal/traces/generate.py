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
from dataclasses import asdict
from pathlib import Path

from ..config import parse_size
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


def _run_generation(config: GenerateConfig, stop: GracefulStop) -> dict:
    import torch

    from .models import decoder_blocks, load_model, model_identity, resolve_layers
    from .sampling import BlockCapture, CaptureBudget, Interrupted, SamplingSettings, sample_batch, trace_seed

    config.validate()
    shard, num_shards = config.shard_pair()
    problems = load_problems(config.dataset, config.split)
    mine = shard_problems(problems, shard, num_shards, config.max_problems)
    target = {"correct": math.ceil(config.target_correct / num_shards),
              "incorrect": math.ceil(config.target_incorrect / num_shards)}
    model, tokenizer = load_model(config.model, revision=config.revision, compute_dtype=config.compute_dtype,
                                  device_map=config.device_map, trust_remote_code=config.trust_remote_code)
    if stop():  # stopped while the model loaded: nothing was touched
        return _summary("interrupted", stop, config, len(mine), layers=[], targets_met=False)
    blocks = decoder_blocks(model)
    layers = resolve_layers(config.layers, len(blocks))
    store_dtype = _store_dtype(config.dtype, model)
    d_model = int(model.config.hidden_size)
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "queue_batches")}
    # Grading reads thinking from the rendered prompt (R1-Distill templates end it with <think>\n); the store says so.
    sample_prompt = build_prompt(tokenizer, mine[0].question, config.prompt_template, config.chat_template) if mine else []
    settings["prompt_opens_thinking"] = prompt_opens_thinking(tokenizer.decode(sample_prompt, skip_special_tokens=False))
    settings.update(layers_resolved=layers, store_dtype=store_dtype, targets_per_shard=target,
                    compute_dtype_resolved=str(model.dtype).replace("torch.", ""))
    resume_identity = {k: settings[k] for k in ("dataset", "split", "temperature", "top_p", "max_new_tokens",
                                                "samples_per_problem", "seed", "shard", "prompt_template",
                                                "chat_template", "max_problems", "keep_all")}
    resume_identity["dataset"] = dataset_identity(config.dataset, config.split)
    model_id, revision = model_identity(model, config.model)
    writer_kwargs = dict(
        path=config.out, model_id=model_id, model_revision=revision,
        layers=layers, d_model=d_model, dtype=store_dtype, generation_settings=settings,
        dataset_id=str(config.dataset or "tribunal/embedded-problems"), dataset_split=config.split,
        seed=config.seed, resume_identity=resume_identity, durable=config.durable,
        description="Per-token residual-stream activations of chain-of-thought traces sampled by tribunal generate.",
    )
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    eos_ids.discard(None)
    sampling = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens)
    writes = WriterProcess(writer_kwargs, config.queue_batches)
    held = writes.open()
    capture = bar = None
    status, batch_size, new_tokens = "done", config.batch_size, 0
    started = time.time()
    try:  # from here on the writer process is told to close the store, whatever happens
        capture_budget = CaptureBudget(parse_size(config.capture_memory), len(layers), d_model, store_dtype,
                                       config.max_new_tokens, config.queue_batches)
        capture = BlockCapture(blocks, layers, max_bytes=capture_budget.batch_bytes)
        counts, tried, done_pairs = Counter(held["labels"]), set(held["problems_done"]), held["done_keys"]
        if held["n_traces"] or tried:
            log.info("resuming %s: %d traces committed (%s), %d problems done%s", config.out, held["n_traces"],
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), len(tried),
                     f"; repaired: {'; '.join(held['repairs'])}" if held["repairs"] else "")
        todo = [p for p in mine if p.problem_id not in tried]
        pairs = [(p, s) for p in todo for s in range(config.samples_per_problem)
                 if (p.problem_id, s) not in done_pairs]
        last_pair = {p.problem_id: (p.problem_id, config.samples_per_problem - 1) for p in todo}
        prompts, thinking = {}, {}
        bar = _progress(config, len(mine), len(tried))
        i = 0
        while i < len(pairs):
            if _targets_met(counts, target) and not config.keep_all:
                break
            if stop():
                status = "interrupted"
                break
            chunk = pairs[i : i + batch_size]
            for p, _ in chunk:
                if p.problem_id not in prompts:
                    prompts[p.problem_id] = build_prompt(tokenizer, p.question, config.prompt_template,
                                                         config.chat_template)
                    thinking[p.problem_id] = prompt_opens_thinking(
                        tokenizer.decode(prompts[p.problem_id], skip_special_tokens=False))
            chunk = chunk[: capture_budget.traces_per_batch([len(prompts[p.problem_id]) for p, _ in chunk])]
            seeds = [trace_seed(config.seed, p.problem_id, s) for p, s in chunk]
            try:
                sampled = sample_batch(
                    model, capture, [prompts[p.problem_id] for p, _ in chunk], seeds, sampling, eos_ids,
                    tokenizer.pad_token_id, store_dtype, should_stop=stop)
            except Interrupted:
                status = "interrupted"
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise TribunalError("out of memory with --batch-size 1: use a smaller --max-new-tokens, "
                                        "fewer --layers, or more GPUs (--device-map auto)") from None
                batch_size = max(1, batch_size // 2)
                log.warning("CUDA out of memory: halving the batch to %d and retrying", batch_size)
                capture.release()
                torch.cuda.empty_cache()
                continue
            records, finished_problems = [], []
            for (p, s), t, seed in zip(chunk, sampled, seeds):
                text = tokenizer.decode([x for x in t.generated_ids if x not in eos_ids], skip_special_tokens=False)
                label, predicted = grade_with_answer(text, p.gold, finished=t.finished,
                                                     thinking=thinking[p.problem_id])
                new_tokens += len(t.generated_ids)
                keep = config.keep_all or label not in target or counts[label] < target[label]
                if keep:
                    counts[label] += 1
                    records.append(TraceRecord(
                        problem_id=p.problem_id, sample_index=s, token_ids=t.prompt_ids + t.generated_ids,
                        prompt_length=len(t.prompt_ids), activations=t.activations, label=label, text=text,
                        predicted=predicted, gold=p.gold,
                        finish_reason="stop" if t.finished else "length", logprobs=t.logprobs,
                        entropies=t.entropies, seed=seed))
                if (p.problem_id, s) == last_pair[p.problem_id]:
                    finished_problems.append((p.problem_id, config.samples_per_problem))
            writes.put(records, finished_problems, sampled[0].ready)
            i += len(chunk)
            tried.update(pid for pid, _ in finished_problems)
            bar.update(len(finished_problems))
            bar.set_postfix_str(_postfix(counts, new_tokens, started, config.out))
    finally:
        if capture is not None:
            capture.remove()
        if bar is not None:
            bar.close()
        held = writes.finish()
    seconds = time.time() - started
    return _summary(status, stop, config, len(mine), layers=layers,
                    targets_met=_targets_met(Counter(held["labels"]), target), held=held, seconds=seconds,
                    new_tokens=new_tokens)


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


def _targets_met(counts: Counter, target: dict) -> bool:
    return all(counts[label] >= n for label, n in target.items())


def _progress(config, total, initial):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"generate {config.shard}", unit="problem",
                disable=not config.progress, dynamic_ncols=True)


def _postfix(counts, new_tokens, started, store_path) -> str:
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
