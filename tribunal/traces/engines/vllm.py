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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ...config import parse_budget
from ..capture.teacher_forcing import forcer_for
from ..ledger import RunLedger, SampledTrace, no_wait, trace_seed
from ..vllm_engine import IN_FLIGHT_PER_SEQ, abort, render_prompt, traces_to_start

log = logging.getLogger("tribunal.generate")

# The largest gap between the log-prob vLLM reports for a sampled token and the teacher-forced one that the
# run accepts quietly, in nats, by compute dtype; a larger gap is logged as a warning (docs/engines.md).
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}

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
            allowed = traces_to_start(ledger, cap) - (sampled - sum(ledger.graded.values()))
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
            abort(engine, list(in_flight))
        worker.shutdown(wait=True)
        forcer.remove()
    if gap["tokens"]:
        _judge_gap(gap, str(model.dtype).replace("torch.", ""))
    return status, {"vllm_logprob_gap": gap}


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


def _done(prompts, run_seed: int, problem, sample, out) -> _Done:
    completion = out.outputs[0]
    ids = list(completion.token_ids)
    reported = np.array([entries[token].logprob if entries and token in entries else np.nan
                         for token, entries in zip(ids, completion.logprobs or [None] * len(ids))], np.float32)
    return _Done(list(prompts.ids(problem)), ids, reported, completion.finish_reason == "stop",
                 trace_seed(run_seed, problem.problem_id, sample))


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
