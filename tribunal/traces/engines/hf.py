"""The hf engine: tribunal's own batched decode loop over a transformers model, with the KV cache, capturing
the residual stream of the target layers for every token while it decodes.

tribunal runs its own decode loop instead of `generate()` because it needs, per
trace: its own random generator (seeded from run seed, problem and sample, so a
resumed or sharded run samples the same traces), the log-prob and entropy of
each sampled token, and the hidden state leaving each target block at every
position, prompt included. Forward hooks on the decoder blocks (capture/hooks.py)
collect those states on the device; they go to the host once per batch, asynchronously.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...config import parse_budget
from ...errors import TribunalError
from ..capture.hooks import BlockCapture, CaptureBudget, host_copy
from ..intervention import Intervention, InterventionSpec
from ..ledger import RunLedger, SampledTrace, no_wait, trace_seed
from ..models import decoder_blocks

log = logging.getLogger("tribunal.generate")

HF_CAPTURE_BYTES = 8 << 30  # --capture-memory auto for this engine


class Interrupted(Exception):
    """A stop was requested while a batch was in flight; the batch is dropped whole."""


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _cache_argument(model) -> str:
    """transformers 5.x names the KV cache `cache`; 4.x `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    return out.get("cache", None) if out.get("cache", None) is not None else out.get("past_key_values")


def _rows_still_to_feed(feed: dict, unfed: torch.Tensor, cache_arg: str) -> torch.Tensor | None:
    """Cut `feed` down to the rows whose last token was never fed (the traces that ended at this step:
    the others' last tokens went through the model while the batch ran on), so the last forward runs
    on those rows alone (often the samples of one problem, which end together), at a fraction of a
    full batch's cost on a CPU. Returns the rows kept (on the CPU, which indexes tensors on any
    device), or None where the feed stays whole: all rows are needed, or the cache cannot select
    rows (legacy tuple caches)."""
    rows = unfed.nonzero()[:, 0].cpu()
    cache = feed[cache_arg]
    if len(rows) == len(unfed) or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(rows)  # in place: the cache is not used after this forward
    for name in ("input_ids", "attention_mask", "position_ids"):
        feed[name] = feed[name][rows.to(feed[name].device)]
    return rows


class LiveReadout:
    """The monitor's side of a batch: the BatchWatch that follows each trace, and its two linear read-outs as
    tensors on the model's device (the chunk probe's logit and the token direction's score), each at its
    layer's index among the captured layers."""

    def __init__(self, watch, capture_layers: list[int], device):
        d = watch.directions
        self.watch = watch
        self.chunk = self._readout(d.chunk_layer, d.chunk_weights, d.chunk_bias, capture_layers, device)
        self.token = self._readout(d.token_layer, d.token_weights, -d.token_offset, capture_layers, device)

    @staticmethod
    def _readout(layer, weights, offset, capture_layers, device):
        if layer is None:
            return None
        return capture_layers.index(layer), torch.tensor(weights, dtype=torch.float32, device=device), float(offset)

    def scores(self, capture: BlockCapture, position: int, rows: torch.Tensor) -> tuple[list, list]:
        """(chunk logits, token scores) of `rows` at one captured position (NaN for a read-out not monitored)."""
        out = []
        for readout in (self.chunk, self.token):
            if readout is None:
                out.append([float("nan")] * len(rows))
                continue
            index, weights, offset = readout
            states = capture.column(index, position)[rows.to(weights.device)]
            out.append(((states.float() @ weights) + offset).tolist())
        return out[0], out[1]


@torch.no_grad()
def sample_batch(model, capture: BlockCapture | None, prompts: list[list[int]], seeds: list[int],
                 settings: SamplingSettings, eos_ids: set[int], pad_id: int, store_dtype: str = "float16",
                 should_stop=lambda: False, readout: LiveReadout | None = None,
                 stored_layers: int | None = None, intervention: Intervention | None = None) -> list[SampledTrace]:
    """Sample one continuation per prompt. capture=None samples without capturing (the benchmark's baseline).
    readout: the live monitor (and exit policy) of this batch; stored_layers: how many of the captured layers
    are stored (the first ones; the rest are captured for the monitor only); intervention: the steering hook,
    told where this batch's prompts end."""
    device = model.get_input_embeddings().weight.device
    ids, mask, width = _left_padded(prompts, pad_id, device)
    if intervention is not None:
        intervention.leave_prompt(width)
    if capture is not None:  # drops what an interrupted batch left
        capture.start(len(prompts), width + settings.max_new_tokens, getattr(torch, store_dtype), device)
    gen, logps, ents, lengths = _decode(model, capture, ids, mask, seeds, settings, eos_ids, should_stop, readout,
                                        [len(p) for p in prompts])
    words, ready, reused = (None, no_wait, False) if capture is None else _host_copy(capture, store_dtype)
    if words is not None and stored_layers is not None and stored_layers < words.shape[0]:
        words = words[:stored_layers]
    watch = readout.watch if readout is not None else None
    traces = []
    for i, p in enumerate(prompts):
        n = lengths[i]
        start = width - len(p)
        kept = watch.kept_steps(i, n) if watch is not None else None
        steps = np.arange(n) if kept is None else np.asarray(kept, np.int64)
        if words is None:
            acts = np.zeros((0, len(p) + len(steps), 0), np.float16)
        elif kept is None:  # a view of the batch's pinned host copy (kept alive by it), or a copy out of the reused one
            acts = words[:, i, start : width + n]
            acts = acts.copy() if reused else acts
        else:  # an exited trace: its prompt, its thinking up to the exit chunk, then its forced answer
            acts = words[:, i, np.concatenate([np.arange(start, width), width + steps])]
        monitor = exit_ = verdict = None
        if watch is not None:
            monitor, exit_ = watch.record(i, len(p), len(steps))
            verdict = watch.intermediate(i)
        traces.append(SampledTrace(
            prompt_ids=list(p), generated_ids=gen[i, steps].tolist(), activations=acts,
            logprobs=logps[i, steps].copy(), entropies=ents[i, steps].copy(),
            finished=bool(len(steps)) and int(gen[i, steps[-1]]) in eos_ids, ready=ready, monitor=monitor, exit=exit_,
            verdict=verdict,
        ))
    return traces


def _left_padded(prompts, pad_id: int, device):
    """(ids, attention mask, width): the prompts left-padded to one width, on the device."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device), width


def _decode(model, capture, ids, mask, seeds, settings: SamplingSettings, eos_ids, should_stop, readout=None,
            prompt_lengths=None):
    """The decode loop with the KV cache: per-trace generators, temperature and top-p, each sampled token's
    log-prob and the entropy of its distribution; every fed token's states go through the capture hooks.
    With a readout, each fed token is scored and shown to the exit policy; a trace where it fires stops
    (intermediate answer) or has its lookahead tokens masked out and the answer cue fed (forced answer).
    Returns (tokens, log-probs, entropies, lengths) on the host; `lengths` counts each trace's decode steps."""
    device, batch = ids.device, len(ids)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    eos = torch.tensor(sorted(eos_ids), device=device)
    cache_arg = _cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    past, logits = _cache_of(out), out.logits[:, -1]
    tokens, logps, ents = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), settings.max_new_tokens, dtype=torch.long, device=device)
    watch = readout.watch if readout is not None else None
    cue = watch.policy.cue_ids if watch is not None and watch.policy is not None else ()
    cue_logps = []  # per step, the log-prob of the answer cue's first token: what it gets when it follows a chunk
    forced_at = {}  # row -> (first answer step, exit chunk's last token)
    for step in range(settings.max_new_tokens):
        if should_stop():
            raise Interrupted()
        logp = torch.log_softmax(logits.float() / max(settings.temperature, 1e-6), dim=-1)
        probs = logp.exp()
        entropy = -(probs * logp).sum(-1)
        probs = _top_p(probs, settings.top_p)
        nxt = torch.cat([torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(batch)])
        if watch is not None:
            alive = (~finished).nonzero()[:, 0].cpu()  # the traces this step samples for
            for i, token in watch.force(step, alive.tolist()):
                nxt[i] = token
                forced_at.setdefault(i, (step, watch.rows[i].exit["token"]))
            if cue:
                cue_logps.append(logp[:, cue[0]])
        tokens.append(nxt)
        logps.append(logp.gather(1, nxt[:, None])[:, 0])
        ents.append(entropy)
        stopped = ~finished & torch.isin(nxt, eos)
        if cue:  # a forced answer that used its budget ends as if it had ended by itself
            for i in alive.tolist():
                if watch.answer_done(i):
                    stopped[i] = True
        lengths[stopped] = step + 1
        finished |= stopped
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        last_step = bool(finished.all()) or step + 1 == settings.max_new_tokens
        if last_step and capture is None:
            break
        # Feed the sampled token: its hidden states are captured here.
        feed = dict(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_arg: past})
        if last_step:  # the last token's residual is stored too; its logits would be unused
            rows = _rows_still_to_feed(feed, lengths == step + 1, cache_arg)
            capture.capture_only(model, feed, rows)
        else:
            out = model(**feed)
            past, logits = _cache_of(out), out.logits[:, -1]
        if watch is not None:
            ended = stopped.cpu()
            _observe(readout, capture, step, width, alive, nxt, logps[-1], ended, prompt_lengths, mask, positions,
                     finished, lengths)
            if last_step or bool(finished.all()):
                break
        elif last_step:
            break
    if watch is not None:
        for i in (~finished).nonzero()[:, 0].tolist():  # hit the token limit: their last chunk is final now
            watch.finish(i)
    logps, ents = torch.stack(logps, dim=1), torch.stack(ents, dim=1)
    for i, (first, end) in forced_at.items():  # the cue's first token follows the chunk, not the masked lookahead
        logps[i, first], ents[i, first] = cue_logps[end + 1][i], ents[i, end + 1]
    return torch.stack(tokens, dim=1).cpu(), logps.cpu().numpy(), ents.cpu().numpy(), lengths.cpu().tolist()


def _observe(readout: LiveReadout, capture, step, width, alive, nxt, logp, ended, prompt_lengths, mask, positions,
             finished, lengths) -> None:
    """Score this step's token of each live trace and act on the exit policy's decisions."""
    watch = readout.watch
    chunk, token = readout.scores(capture, width + step, alive)
    fired = watch.observe(step, alive.tolist(), nxt[alive.to(nxt.device)].tolist(), chunk, token,
                          logp[alive.to(logp.device)].tolist())
    ended = ended.tolist()
    for i in alive.tolist():
        if ended[i]:
            watch.finish(i)
    for i, end in fired:
        if watch.policy.answer == "intermediate":
            finished[i] = True
            lengths[i] = step + 1
        else:  # hide the tokens sampled past the chunk's end; the cue follows the chunk's last token
            mask[i, width + end + 1 :] = 0
            positions[i] = prompt_lengths[i] + end


def sample_with_hf(config, model, layers: list[int], store_dtype: str, ledger: RunLedger, writes, stop,
                   watching=None) -> str:
    """Sample, grade and hand over batches until the targets are met, the pairs run out or a stop comes;
    returns 'done' or 'interrupted'. config: the run's GenerateConfig; writes: the store's WriterProcess;
    watching: the run's monitor.Watching for --monitor / --exit-policy (one BatchWatch per batch); the run's
    `config.intervention` (tribunal steer's arm), when set, acts at its layer before anything is captured there."""
    intervention = (Intervention(decoder_blocks(model), InterventionSpec.from_settings(config.intervention))
                    if config.intervention else None)
    monitor_only = [x for x in (watching.layers if watching else []) if x not in layers]
    captured = list(layers) + monitor_only  # the monitor's layers ride along, not stored
    budget = CaptureBudget(parse_budget(config.capture_memory) or HF_CAPTURE_BYTES, len(captured),
                           int(model.config.hidden_size), store_dtype, config.max_new_tokens, config.queue_batches)
    capture = BlockCapture(decoder_blocks(model), captured, max_bytes=budget.batch_bytes)
    sampling = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens)
    prompts, pairs = ledger.prompts, ledger.pairs
    batch_size, i = config.batch_size, 0
    device = model.get_input_embeddings().weight.device
    try:
        while i < len(pairs):
            if ledger.has_enough():
                return "done"
            if stop():
                return "interrupted"
            chunk = pairs[i : i + batch_size]
            chunk = chunk[: budget.traces_per_batch([len(prompts.ids(p)) for p, _ in chunk])]
            seeds = [trace_seed(config.seed, p.problem_id, s) for p, s in chunk]
            readout = LiveReadout(watching.batch([p.gold for p, _ in chunk]), captured, device) if watching else None
            try:
                sampled = sample_batch(model, capture, [prompts.ids(p) for p, _ in chunk], seeds, sampling,
                                       prompts.eos_ids, prompts.pad_id, store_dtype, should_stop=stop,
                                       readout=readout, stored_layers=len(layers), intervention=intervention)
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
            records, finished_problems = ledger.grade(chunk, sampled, seeds)
            writes.put(records, finished_problems, sampled[0].ready)
            i += len(chunk)
            ledger.advance(finished_problems)
        return "done"
    finally:
        capture.remove()
        if intervention is not None:
            intervention.remove()


def _host_copy(capture: BlockCapture, store_dtype: str):
    """(words, ready, reused): the batch's captured states as storage words on the host. On a GPU, an
    asynchronous copy into pinned memory (the next batch starts while this one travels; `ready` waits for it);
    on a CPU, the capture buffer itself (`reused`: the next batch overwrites it, so traces copy their part)."""
    words, ready = host_copy(capture.take(), store_dtype)  # (layers, batch, positions, d_model)
    return words, ready or no_wait, ready is None
