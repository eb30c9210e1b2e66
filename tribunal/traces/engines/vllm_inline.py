"""`generate --engine vllm --capture inline`: vLLM samples and captures in the same forward (vllm_worker.py), no
second pass.

The last token a request samples is never fed back through the model, so its residual would never be computed:
requests go to vLLM with one token more than --max-new-tokens, ignore_eos and no stop tokens, and this loop
applies the stop rules itself. Once a trace's stop token (or its --max-new-tokens-th token) has been fed, that is
once the token after it has been sampled, the trace is cut there, its request aborted, and its rows taken from
the worker, checked (every position of prompt and trace present, the sampled tokens the trace's own), graded and
handed to the store's writer process. The extra token costs about one decode slot per trace.

Prefix caching is off for inline capture: a prompt block served from the cache is never forwarded, so its
residuals would be missing. Each sample forwards its prompt (GSM8K prompts are short beside their traces).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ...config import parse_budget
from ...errors import TribunalError
from ...store.format import DTYPES
from ..ledger import RunLedger, SampledTrace, no_wait, trace_seed
from .vllm import IN_FLIGHT_PER_SEQ, _abort, _traces_to_start, render_prompt

log = logging.getLogger("tribunal.generate")
DEFAULT_CAPTURE_BYTES = 2 << 30  # --capture-memory auto: host rows of the requests in flight


@dataclass
class _Live:
    """A request in flight: its (problem, sample), vLLM's internal id (the worker's key) and what it sampled."""

    problem: object
    sample: int
    internal_id: str
    prompt_ids: list
    seed: int
    generated: list = field(default_factory=list)
    ended: bool = False  # vLLM finished the request itself (its length limit)


def cut(generated: list, eos_ids, max_new_tokens: int, ended: bool) -> tuple[int, bool] | None:
    """Where a trace ends once the token that ends it has been fed: (tokens kept, stopped at a stop token), or
    None while the token that ends it has not been fed yet (the next one is not sampled)."""
    for k, token in enumerate(generated[:max_new_tokens]):
        if token in eos_ids:
            return (k + 1, True) if len(generated) > k + 1 or ended else None
    if len(generated) > max_new_tokens:
        return max_new_tokens, False
    if ended:  # vLLM stopped it short of the limit (its model length): the last token was never fed
        return max(len(generated) - 1, 0), False
    return None


def assemble(taken: dict, prompt_ids: list, generated_ids: list, n_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The worker's rows of one request as (layers, tokens, d) states in the store's words, and per generated
    token its log-prob and entropy; refuses rows that do not cover the trace or scores of other tokens."""
    total, p = len(prompt_ids) + len(generated_ids), len(prompt_ids)
    positions = np.asarray(taken["positions"], np.int64)
    states = np.frombuffer(taken["states"], dtype=np.dtype(taken["dtype"])).reshape(taken["shape"])
    if len(positions) < total or not np.array_equal(positions[:total], np.arange(total)):
        raise RuntimeError(f"inline capture is missing positions of a trace ({len(positions)} rows for {total} "
                           "tokens): a defect of tribunal's vLLM capture; use --capture forward meanwhile")
    scores = taken["scores"]
    logprobs = np.empty(len(generated_ids), np.float32)
    entropies = np.empty(len(generated_ids), np.float32)
    for j, token in enumerate(generated_ids):
        entry = scores.get(str(p + j))
        if entry is None or int(entry[0]) != int(token):
            raise RuntimeError(f"inline capture scored another token than the trace holds at position {p + j}: a "
                               "defect of tribunal's vLLM capture; use --capture forward meanwhile")
        logprobs[j], entropies[j] = entry[1], entry[2]
    activations = np.ascontiguousarray(states[:total].transpose(1, 0, 2))
    assert activations.shape[0] == n_layers
    return activations, logprobs, entropies


def in_flight_cap(config, engine, layers: int, d_model: int, store_dtype: str, longest_prompt: int) -> int:
    """Requests in flight: IN_FLIGHT_PER_SEQ x vLLM's batch, fewer where their host rows would pass
    --capture-memory (each may reach its prompt + --max-new-tokens + 1 rows)."""
    cap = IN_FLIGHT_PER_SEQ * int(engine.vllm_config.scheduler_config.max_num_seqs)
    budget = parse_budget(config.capture_memory) or DEFAULT_CAPTURE_BYTES
    per_trace = (longest_prompt + config.max_new_tokens + 1) * layers * d_model * DTYPES[store_dtype][2]
    fits = budget // per_trace
    if fits < 1:
        raise TribunalError(f"--capture-memory {config.capture_memory} cannot hold one trace's rows "
                            f"({per_trace / 2**20:.1f} MiB): raise it, or capture fewer --layers")
    return int(min(cap, fits))


def sample_inline(config, llm, layers: list[int], d_model: int, store_dtype: str, ledger: RunLedger, writes, stop,
                  per_trace_seeds: bool) -> tuple[str, dict]:
    """Sample and capture in vLLM, grade and hand over traces until the targets are met, the pairs run out or a
    stop comes. Returns ('done' or 'interrupted', {}): nothing to compare, the scores are vLLM's own."""
    engine = llm.llm_engine
    prompts, pairs, eos = ledger.prompts, ledger.pairs, set(ledger.prompts.eos_ids)
    longest = max((len(prompts.ids(p)) for p, _ in pairs), default=1)
    cap = in_flight_cap(config, engine, len(layers), d_model, store_dtype, longest)
    in_flight: dict[str, _Live] = {}
    status, i = "done", 0
    try:
        while True:
            if stop():
                status = "interrupted"
                break
            if ledger.has_enough():
                break
            while len(in_flight) < min(cap, _traces_to_start(ledger, cap)) and i < len(pairs):
                problem, sample = pairs[i]
                live = _submit(engine, config, prompts, problem, sample, per_trace_seeds)
                in_flight[f"{problem.problem_id}/{sample}"] = live
                i += 1
            if not in_flight:
                break
            try:
                outputs = engine.step()
            except Exception:
                if stop():
                    status = "interrupted"
                    break
                raise
            done = []
            for out in outputs:
                live = in_flight.get(out.request_id)
                if live is None:
                    continue
                live.generated.extend(out.outputs[0].token_ids)
                live.ended = live.ended or out.finished
                kept = cut(live.generated, eos, config.max_new_tokens, live.ended)
                if kept is not None:
                    done.append((in_flight.pop(out.request_id), kept))
            if done:
                _hand_over(engine, ledger, writes, done, len(layers))
    finally:
        if in_flight:
            _abort(engine, [live.internal_id for live in in_flight.values()], internal=True)
            _take(engine, [live.internal_id for live in in_flight.values()])  # frees the worker's rows
    return status, {}


def _hand_over(engine, ledger: RunLedger, writes, done, n_layers: int) -> None:
    """Abort the requests that sampled past their cut, take their rows, grade them and queue them for the store."""
    open_ids = [live.internal_id for live, _ in done if not live.ended]
    if open_ids:
        _abort(engine, open_ids, internal=True)
    taken = _take(engine, [live.internal_id for live, _ in done])
    sampled = []
    for (live, (keep, finished)), rows in zip(done, taken):
        generated = live.generated[:keep]
        activations, logprobs, entropies = assemble(rows, live.prompt_ids, generated, n_layers)
        sampled.append(SampledTrace(prompt_ids=live.prompt_ids, generated_ids=generated, activations=activations,
                                    logprobs=logprobs, entropies=entropies, finished=finished))
    records, finished_problems = ledger.grade([(live.problem, live.sample) for live, _ in done], sampled,
                                              [live.seed for live, _ in done])
    writes.put(records, finished_problems, no_wait)
    ledger.advance(finished_problems)


def _take(engine, internal_ids: list[str]) -> list[dict]:
    """The worker's rows of these requests (rank 0's: the residual stream is the same on every rank)."""
    return engine.collective_rpc("tribunal_take", args=(internal_ids,))[0]


def _submit(engine, config, prompts, problem, sample, per_trace_seeds: bool) -> _Live:
    """One (problem, sample) to vLLM: one token past --max-new-tokens, no stop tokens (see the module's note)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    seed = trace_seed(config.seed, problem.problem_id, sample)
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens + 1,
                            ignore_eos=True, seed=seed if per_trace_seeds else None, skip_special_tokens=False,
                            detokenize=False, output_kind=RequestOutputKind.DELTA)
    ids = list(prompts.ids(problem))
    internal = engine.add_request(f"{problem.problem_id}/{sample}", render_prompt(engine, ids), params)
    return _Live(problem, sample, internal, ids, seed)
