"""`tribunal generate`: sample and grade traces, stream activations of every target layer into a store.

This module loads (the shard's problems, the model), opens the store through its writer process
(store_process.py), picks the engine that samples (engines/hf.py: tribunal's decode loop; engines/vllm.py:
vLLM, captured by teacher forcing) and summarizes. The engines sample batches of the (problem, sample) pairs
the store does not hold yet, grade them (ledger.py) and hand finished traces to the writer process through a
bounded queue, so the model never waits on the disk and memory stays bounded when the disk is slow. A stop
signal (SIGUSR1, SIGTERM, SIGINT) drops the batch in flight, commits what is queued, closes the store and
returns INTERRUPTED; rerunning the same command resumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass

from ..problems.loading import dataset_identity, load_problems, shard_problems
from .ledger import Prompts, RunLedger, targets_met
from .settings import GenerateConfig
from .stop import EXIT_INTERRUPTED, GracefulStop
from .store_process import WriterProcess

__all__ = ["EXIT_INTERRUPTED", "GenerateConfig", "run_generation", "format_summary"]

log = logging.getLogger("tribunal.generate")


def run_generation(config: GenerateConfig) -> dict:
    """Generate into config.out; returns a summary with 'status' = 'done' or 'interrupted'.

    Stop signals are caught from the first line: a preemption while a large model is still loading
    ends the run as 'interrupted' (resumable) too, before the store is touched.
    """
    with GracefulStop() as stop:
        return _run_generation(config, stop)


@dataclass(frozen=True)
class _Loaded:
    """What a run loads before it samples: the shard's problems and targets, the model and its prompts, and with
    --engine vllm the vLLM engine that samples (the model above captures)."""

    problems: list
    target: dict
    model: object
    prompts: Prompts
    layers: list
    store_dtype: str
    llm: object = None
    per_trace_seeds: bool = True
    watching: object = None  # monitor.Watching with --monitor / --exit-policy


def _run_generation(config: GenerateConfig, stop: GracefulStop) -> dict:
    config.validate()
    loaded = _load(config, stop)
    if stop():  # stopped while the model loaded: nothing was touched
        return _summary("interrupted", stop, config, len(loaded.problems), layers=[], targets_met=False)
    writes = WriterProcess(_writer_kwargs(config, loaded), config.queue_batches)
    held = writes.open()
    status, notes = "done", {}
    try:  # from here on the writer process is told to close the store, whatever happens
        _log_resume(config, held)
        ledger = RunLedger(loaded.problems, held, loaded.target, config.samples_per_problem, config.keep_all,
                           loaded.prompts)
        with ledger.progress(f"generate {config.shard}", config.progress, config.out):
            if config.engine == "vllm" and config.capture == "inline":
                from .engines.vllm_inline import sample_inline

                status, notes = sample_inline(config, loaded.llm, loaded.layers, int(loaded.model.config.hidden_size),
                                              loaded.store_dtype, ledger, writes, stop, loaded.per_trace_seeds,
                                              loaded.watching)
            elif config.engine == "vllm":
                from .engines.vllm import sample_with_vllm

                status, notes = sample_with_vllm(config, loaded.llm, loaded.model, loaded.layers, loaded.store_dtype,
                                                 ledger, writes, stop, loaded.per_trace_seeds)
            else:
                from .engines.hf import sample_with_hf

                status = sample_with_hf(config, loaded.model, loaded.layers, loaded.store_dtype, ledger, writes, stop,
                                        loaded.watching)
    finally:
        held = writes.finish()
    return {**_summary(status, stop, config, len(loaded.problems), layers=loaded.layers,
                       targets_met=targets_met(Counter(held["labels"]), loaded.target), held=held,
                       seconds=time.time() - ledger.started, new_tokens=ledger.new_tokens), **notes}


def _store_dtype(requested: str, model) -> str:
    """auto: bfloat16 words when the model computes in bf16 (lossless), float16 otherwise."""
    if requested != "auto":
        return requested
    import torch

    return "bfloat16" if model.dtype == torch.bfloat16 else "float16"


def _load(config: GenerateConfig, stop: GracefulStop) -> _Loaded:
    """The shard's problems and the model (the slow part: a stop signal meanwhile is honoured after it)."""
    from .models import decoder_blocks, load_model, resolve_layers

    shard, num_shards = config.shard_pair()
    problems = shard_problems(load_problems(config.dataset, config.split), shard, num_shards, config.max_problems)
    target = {"correct": math.ceil(config.target_correct / num_shards),
              "incorrect": math.ceil(config.target_incorrect / num_shards)}
    inline = config.engine == "vllm" and config.capture == "inline"  # vLLM computes everything: no weights here
    model, tokenizer = load_model(config.model, revision=config.revision, compute_dtype=config.compute_dtype,
                                  device_map=config.device_map, trust_remote_code=config.trust_remote_code,
                                  weights=not inline)
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    eos_ids.discard(None)
    prompts = Prompts(tokenizer, config.prompt_template, config.chat_template, eos_ids)
    loaded = dict(problems=problems, target=target, model=model, prompts=prompts,
                  layers=resolve_layers(config.layers, len(decoder_blocks(model))),
                  store_dtype=_store_dtype(config.dtype, model))
    if (config.monitor or config.exit_policy) and not stop():
        loaded["watching"] = _watching(config, model, tokenizer, prompts, problems, eos_ids)
    if config.engine == "vllm" and not stop():
        from .vllm_engine import per_request_seeds, start_engine

        positions = getattr(model.config, "max_position_embeddings", None) or math.inf
        longest = max((len(prompts.ids(p)) for p in problems), default=1)
        capture = None
        if config.capture == "inline":  # its requests sample one token past the limit (engines/vllm_inline.py)
            from .capture.vllm_worker import CaptureSettings

            watching = loaded.get("watching")
            monitor_only = sorted(set(watching.layers) - set(loaded["layers"])) if watching is not None else []
            capture = CaptureSettings(tuple(loaded["layers"]), loaded["store_dtype"], float(config.temperature),
                                      tuple(monitor_only))
        # the longest sequence rounded up to a power of two (runs of like settings share an engine in a process)
        need = 1 << (longest + config.max_new_tokens + (capture is not None) - 1).bit_length()
        llm = start_engine(config, model, tokenizer, int(min(positions, need)), capture)
        loaded.update(llm=llm, per_trace_seeds=per_request_seeds(llm))
    return _Loaded(**loaded)


def _watching(config: GenerateConfig, model, tokenizer, prompts: Prompts, problems, eos_ids):
    """The run's monitor and exit policy, checked against this model before the store is touched."""
    from .models import decoder_blocks, model_identity
    from .monitor import Watching, load_directions, load_policy

    probes = config.exit_policy or config.monitor
    directions = load_directions(probes, model_identity(model, config.model)[0], int(model.config.hidden_size),
                                 len(decoder_blocks(model)), need_chunk=bool(config.exit_policy))
    policy = None
    if config.exit_policy:
        prompt = tokenizer.decode(prompts.ids(problems[0]), skip_special_tokens=False) if problems else ""
        policy = load_policy(config, tokenizer, prompt)
    return Watching(directions, policy, tokenizer, frozenset(eos_ids))


def _log_resume(config: GenerateConfig, held: dict) -> None:
    if held["n_traces"] or held["problems_done"]:
        log.info("resuming %s: %d traces committed (%s), %d problems done%s", config.out, held["n_traces"],
                 ", ".join(f"{k} {v}" for k, v in sorted(Counter(held["labels"]).items())),
                 len(set(held["problems_done"])),
                 f"; repaired: {'; '.join(held['repairs'])}" if held["repairs"] else "")


def _writer_kwargs(config: GenerateConfig, loaded: _Loaded) -> dict:
    """The store this run writes: identity (model, layers, settings that must match to resume) and provenance."""
    from .models import model_identity

    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "queue_batches", "intervention")}
    if config.engine == "hf":
        del settings["vllm_memory"], settings["capture"]
    if config.intervention is not None:  # a steered store says so (the vector itself by its hash: see `steer`)
        settings["intervention"] = {k: v for k, v in config.intervention.items() if k != "vector"}
    # the store records whether the prompt opens thinking (grading reads it per prompt)
    settings["prompt_opens_thinking"] = bool(loaded.problems) and loaded.prompts.opens_thinking(loaded.problems[0])
    settings.update(layers_resolved=loaded.layers, store_dtype=loaded.store_dtype, targets_per_shard=loaded.target,
                    compute_dtype_resolved=str(loaded.model.dtype).replace("torch.", ""),
                    per_trace_seeds=loaded.per_trace_seeds)
    if config.engine == "vllm":
        import vllm

        settings.update(vllm_version=vllm.__version__, captured_by="teacher forcing (transformers)"
                        if config.capture == "forward" else "vLLM's forward (aux hidden states, V1 model runner)")
    resume_identity = {k: settings[k] for k in ("split", "temperature", "top_p", "max_new_tokens",
                                                "samples_per_problem", "seed", "shard", "prompt_template",
                                                "chat_template", "max_problems", "keep_all")}
    if "intervention" in settings:  # a resumed arm must be the same arm
        resume_identity["intervention"] = settings["intervention"]
    if loaded.watching is not None:  # scores and exits must mean the same thing throughout a store
        watched = loaded.watching.settings()
        settings.update(watched)
        resume_identity.update(watched)
    resume_identity["dataset"] = dataset_identity(config.dataset, config.split)
    if config.engine != "hf":  # an hf store's identity is as it was before engines, so those stores still resume
        resume_identity["engine"] = config.engine
    if config.engine == "vllm" and config.capture == "inline":  # (forward: as before --capture, those resume too)
        resume_identity["capture"] = config.capture
    model_id, revision = model_identity(loaded.model, config.model)
    return dict(
        path=config.out, model_id=model_id, model_revision=revision, layers=loaded.layers,
        d_model=int(loaded.model.config.hidden_size), dtype=loaded.store_dtype, generation_settings=settings,
        dataset_id=str(config.dataset or "tribunal/embedded-problems"), dataset_split=config.split,
        seed=config.seed, resume_identity=resume_identity, durable=config.durable,
        monitor_fields=loaded.watching.fields if loaded.watching is not None else (),
        exit_table=loaded.watching is not None and loaded.watching.policy is not None,
        description="Per-token residual-stream activations of chain-of-thought traces sampled by tribunal generate.",
    )


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


def format_summary(summary: dict) -> str:
    labels = summary["labels"]
    return (f"{summary['status']}: {summary['store']}: {summary['traces']} traces "
            f"(correct {labels.get('correct', 0)}, incorrect {labels.get('incorrect', 0)}, "
            f"unparsed {labels.get('unparsed', 0)}), {summary['tokens']} tokens, "
            f"{summary['problems_tried']}/{summary['problems_in_shard']} problems tried, "
            f"{summary['new_tokens'] / max(summary['seconds'], 1e-9):.0f} new tok/s"
            + (f"; stopped by {summary['signal']}, rerun the same command to resume" if summary["status"] == "interrupted" else ""))
