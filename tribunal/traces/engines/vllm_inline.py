"""`generate --engine vllm --capture inline`: vLLM samples and captures in the same forward (capture/vllm_worker.py), no
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
import math
from dataclasses import dataclass, field

import numpy as np

from ...config import parse_budget
from ...errors import TribunalError
from ...store.format import DTYPES
from ..ledger import RunLedger, SampledTrace, no_wait, trace_seed
from ..vllm_engine import IN_FLIGHT_PER_SEQ, abort, render_prompt, traces_to_start

log = logging.getLogger("tribunal.generate")
DEFAULT_CAPTURE_BYTES = 2 << 30  # --capture-memory auto: host rows of the requests in flight


@dataclass
class _Live:
    """A request in flight: its (problem, sample), vLLM's internal id (the worker's key) and what it sampled.
    With --monitor: its monitor.BatchWatch (one row), the read-outs and scores drained by position, the next
    generated token to show it. A forced answer's continuation also carries its parent's thinking (the
    tokens up to the exit chunk, their scores) and the answer cue, which open its prompt."""

    problem: object
    sample: int
    internal_id: str
    prompt_ids: list
    seed: int
    generated: list = field(default_factory=list)
    stop_at: int | None = None  # the first stop token among `generated`
    ended: bool = False  # vLLM finished the request itself (its length limit)
    watch: object = None
    readouts: dict = field(default_factory=dict)  # position -> (chunk logit, token score)
    logprobs: dict = field(default_factory=dict)  # position -> log-prob of the token sampled there
    shown: int = 0  # generated tokens (thinking, then answer) shown to the watch
    thinking: list | None = None  # a continuation: its parent's kept thinking tokens
    cue: tuple = ()
    parent_scores: dict = field(default_factory=dict)

    @property
    def prompt_length(self) -> int:  # the problem's prompt (a continuation's own prompt also holds thinking and cue)
        return len(self.prompt_ids)


def first_stop(generated: list, eos_ids, start: int = 0) -> int | None:
    """The index of the first stop token in generated[start:] (None: none yet)."""
    for k in range(start, len(generated)):
        if generated[k] in eos_ids:
            return k
    return None


def cut(generated: list, stop_at: int | None, max_new_tokens: int, ended: bool) -> tuple[int, bool] | None:
    """Where a trace ends once the token that ends it has been fed: (tokens kept, stopped at a stop token), or
    None while the token that ends it has not been fed yet (the next one is not sampled). stop_at: the index
    of its first stop token (first_stop)."""
    if stop_at is not None and stop_at < max_new_tokens:
        return (stop_at + 1, True) if len(generated) > stop_at + 1 or ended else None
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
                  per_trace_seeds: bool, watching=None) -> tuple[str, dict]:
    """Sample and capture in vLLM, grade and hand over traces until the targets are met, the pairs run out or a
    stop comes. watching: the run's monitor.Watching (--monitor, --exit-policy), fed from the read-outs the
    worker computes each step. Returns ('done' or 'interrupted', {}): nothing to compare, the scores are
    vLLM's own."""
    engine = llm.llm_engine
    prompts, pairs, eos = ledger.prompts, ledger.pairs, set(ledger.prompts.eos_ids)
    longest = max((len(prompts.ids(p)) for p, _ in pairs), default=1)
    answer = watching.policy.cue_ids if watching is not None and watching.policy is not None else ()
    cap = in_flight_cap(config, engine, len(layers), d_model, store_dtype,
                        longest + (len(answer) + config.exit_answer_budget if answer else 0))
    engine.collective_rpc("tribunal_readouts", args=(readouts(watching),))
    in_flight: dict[str, _Live] = {}
    status, i = "done", 0
    try:
        while True:
            if stop():
                status = "interrupted"
                break
            if ledger.has_enough():
                break
            while len(in_flight) < min(cap, traces_to_start(ledger, cap)) and i < len(pairs):
                problem, sample = pairs[i]
                live = _submit(engine, config, prompts, problem, sample, per_trace_seeds)
                live.watch = watching.batch([problem.gold]) if watching is not None else None
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
            for out in outputs:
                live = in_flight.get(out.request_id)
                if live is not None:
                    seen = len(live.generated)
                    live.generated.extend(out.outputs[0].token_ids)
                    if live.stop_at is None:
                        live.stop_at = first_stop(live.generated, eos, seen)
                    live.ended = live.ended or out.finished
            if watching is not None:
                _drain(engine, in_flight)
            done, exited = [], []
            for key, live in list(in_flight.items()):
                limit = config.max_new_tokens if live.thinking is None else config.exit_answer_budget
                kept = cut(live.generated, live.stop_at, limit, live.ended)
                end = _watch(live, kept) if live.watch is not None else None
                if end is not None:
                    exited.append((in_flight.pop(key), end))
                elif kept is not None:
                    done.append((in_flight.pop(key), kept))
            for live, end in exited:
                if live.watch.policy.answer == "forced":
                    key, continuation = _force_answer(engine, config, live, end, per_trace_seeds)
                    in_flight[key] = continuation
                else:
                    done.append((live, (end + 1, live.generated[end] in eos)))
            if done:
                _hand_over(engine, ledger, writes, done, len(layers))
    finally:
        if in_flight:
            abort(engine, [live.internal_id for live in in_flight.values()], internal=True)
            _take(engine, [live.internal_id for live in in_flight.values()])  # frees the worker's rows
    return status, {}


def readouts(watching) -> list:
    """The monitor's read-outs for the capture worker, [name, layer, weights, bias] each: the chunk probe's logit
    and the token direction's score, as the hf engine computes them (none without a monitor)."""
    if watching is None:
        return []
    d, out = watching.directions, []
    if d.chunk_layer is not None:
        out.append(["chunk_logit", d.chunk_layer, [float(x) for x in d.chunk_weights], float(d.chunk_bias)])
    if d.token_layer is not None:
        out.append(["token_score", d.token_layer, [float(x) for x in d.token_weights], -float(d.token_offset)])
    return out


def _drain(engine, in_flight: dict) -> None:
    """The read-outs and scores the worker computed this step, filed by position on each live request."""
    drained = engine.collective_rpc("tribunal_drain")[0]
    by_internal = {live.internal_id: live for live in in_flight.values()}
    for internal_id, entry in drained.items():
        live = by_internal.get(internal_id)
        if live is None:
            continue
        chunk = entry.get("chunk_logit") or [math.nan] * len(entry["positions"])
        token = entry.get("token_score") or [math.nan] * len(entry["positions"])
        for q, c, t in zip(entry["positions"], chunk, token):
            live.readouts[q] = (c, t)
        for q, scored in entry["scores"].items():
            live.logprobs[int(q)] = scored[1]


def _watch(live: _Live, kept) -> int | None:
    """Show the watch each generated token whose state has been computed, in order (up to the trace's cut, when
    it has one); returns the exit chunk's last token (a generated-token index) where the policy fires."""
    watch = live.watch
    if live.thinking is None:
        limit = len(live.generated) if kept is None else kept[0]
        base = live.prompt_length
        while live.shown < limit and base + live.shown in live.readouts and base + live.shown in live.logprobs:
            j = live.shown
            chunk, token = live.readouts[base + j]
            live.shown += 1
            fired = watch.observe(j, [0], [live.generated[j]], [chunk], [token], [live.logprobs[base + j]])
            if fired:
                return fired[0][1]
        if kept is not None and watch.rows[0].thinking:
            watch.finish(0)  # the trace ended by itself: its last chunk is final now
        return None
    # a forced answer: its cue, then what it sampled, each a step of the answer (token scores only)
    answer = list(live.cue) + live.generated[: (len(live.generated) if kept is None else kept[0])]
    base = live.prompt_length + len(live.thinking)
    while live.shown < len(answer) and base + live.shown in live.readouts:
        step = len(watch.rows[0].token_score)
        watch.force(step, [0])
        chunk, token = live.readouts[base + live.shown]
        watch.observe(step, [0], [answer[live.shown]], [chunk], [token], [math.nan])
        live.shown += 1
    return None


def _force_answer(engine, config, live: _Live, end: int, per_trace_seeds: bool) -> tuple[str, _Live]:
    """Stop a trace's thinking after its exit chunk's last token `end`: abort its request and submit its prompt,
    that thinking and the answer cue as a new one, which answers within --exit-answer-budget tokens. Its forward
    recomputes every position (prefix caching is off), so its rows cover the whole trace; the cue's log-probs
    and entropies are scored in the worker as if the cue had been sampled."""
    abort(engine, [live.internal_id], internal=True)
    parent = _take(engine, [live.internal_id])[0]
    thinking, cue = live.generated[: end + 1], tuple(live.watch.policy.cue_ids)
    ids = live.prompt_ids + thinking + list(cue)
    params = _params(config, config.exit_answer_budget, live.seed + 1 if per_trace_seeds else None)
    key = f"{live.problem.problem_id}/{live.sample}/answer"
    internal = engine.add_request(key, render_prompt(engine, ids), params)
    first = len(live.prompt_ids) + len(thinking)
    engine.collective_rpc("tribunal_score_tokens", args=(internal, {first + k: t for k, t in enumerate(cue)}))
    return key, _Live(live.problem, live.sample, internal, live.prompt_ids, live.seed, watch=live.watch,
                      thinking=thinking, cue=cue, parent_scores=parent["scores"])


def _hand_over(engine, ledger: RunLedger, writes, done, n_layers: int) -> None:
    """Abort the requests that sampled past their cut, take their rows, grade them and queue them for the store."""
    open_ids = [live.internal_id for live, _ in done if not live.ended]
    if open_ids:
        abort(engine, open_ids, internal=True)
    taken = _take(engine, [live.internal_id for live, _ in done])
    sampled = []
    for (live, (keep, finished)), rows in zip(done, taken):
        if live.thinking is None:
            generated = live.generated[:keep]
        else:  # a forced answer: the parent's thinking, the cue, the answer
            generated = live.thinking + list(live.cue) + live.generated[:keep]
            rows = {**rows, "scores": {**live.parent_scores, **rows["scores"]}}
        activations, logprobs, entropies = assemble(rows, live.prompt_ids, generated, n_layers)
        monitor = exit_ = verdict = None
        if live.watch is not None:
            monitor, exit_ = live.watch.record(0, live.prompt_length, len(generated))
            verdict = live.watch.intermediate(0)
        sampled.append(SampledTrace(prompt_ids=live.prompt_ids, generated_ids=generated, activations=activations,
                                    logprobs=logprobs, entropies=entropies, finished=finished, monitor=monitor,
                                    exit=exit_, verdict=verdict))
    records, finished_problems = ledger.grade([(live.problem, live.sample) for live, _ in done], sampled,
                                              [live.seed for live, _ in done])
    writes.put(records, finished_problems, no_wait)
    ledger.advance(finished_problems)


def _take(engine, internal_ids: list[str]) -> list[dict]:
    """The worker's rows of these requests (rank 0's: the residual stream is the same on every rank)."""
    return engine.collective_rpc("tribunal_take", args=(internal_ids,))[0]


def _params(config, max_new_tokens: int, seed: int | None):
    """One token past the limit, no stop tokens, new tokens as they come (see the module's note)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=max_new_tokens + 1,
                          ignore_eos=True, seed=seed, skip_special_tokens=False, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def _submit(engine, config, prompts, problem, sample, per_trace_seeds: bool) -> _Live:
    """One (problem, sample) to vLLM, seeded from (run seed, problem, sample) where the engine honours it."""
    seed = trace_seed(config.seed, problem.problem_id, sample)
    ids = list(prompts.ids(problem))
    params = _params(config, config.max_new_tokens, seed if per_trace_seeds else None)
    internal = engine.add_request(f"{problem.problem_id}/{sample}", render_prompt(engine, ids), params)
    return _Live(problem, sample, internal, ids, seed)
