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
from ..capture.hooks import BlockCapture, CaptureBudget, host_words
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


@torch.no_grad()
def sample_batch(model, capture: BlockCapture | None, prompts: list[list[int]], seeds: list[int],
                 settings: SamplingSettings, eos_ids: set[int], pad_id: int, store_dtype: str = "float16",
                 should_stop=lambda: False) -> list[SampledTrace]:
    """Sample one continuation per prompt. capture=None samples without capturing (the benchmark's baseline)."""
    device = model.get_input_embeddings().weight.device
    ids, mask, width = _left_padded(prompts, pad_id, device)
    if capture is not None:  # drops what an interrupted batch left
        capture.start(len(prompts), width + settings.max_new_tokens, getattr(torch, store_dtype), device)
    gen, logps, ents, lengths, finished = _decode(model, capture, ids, mask, seeds, settings, eos_ids, should_stop)
    words, ready, reused = (None, no_wait, False) if capture is None else _host_copy(capture, store_dtype)
    traces = []
    for i, p in enumerate(prompts):
        n = lengths[i]
        start = width - len(p)
        if words is None:
            acts = np.zeros((0, len(p) + n, 0), np.float16)
        else:  # a view of this batch's pinned host copy (kept alive by it), or a copy out of the reused buffer
            acts = words[:, i, start : width + n]
            acts = acts.copy() if reused else acts
        traces.append(SampledTrace(
            prompt_ids=list(p), generated_ids=gen[i, :n].tolist(), activations=acts,
            logprobs=logps[i, :n].copy(), entropies=ents[i, :n].copy(), finished=bool(finished[i]), ready=ready,
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


def _decode(model, capture, ids, mask, seeds, settings: SamplingSettings, eos_ids, should_stop):
    """The decode loop with the KV cache: per-trace generators, temperature and top-p, each sampled token's
    log-prob and the entropy of its distribution; every fed token's states go through the capture hooks.
    Returns (tokens, log-probs, entropies, lengths, finished) on the host."""
    device, batch = ids.device, len(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    eos = torch.tensor(sorted(eos_ids), device=device)
    cache_arg = _cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    past, logits = _cache_of(out), out.logits[:, -1]
    tokens, logps, ents = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), settings.max_new_tokens, dtype=torch.long, device=device)
    for step in range(settings.max_new_tokens):
        if should_stop():
            raise Interrupted()
        logp = torch.log_softmax(logits.float() / max(settings.temperature, 1e-6), dim=-1)
        probs = logp.exp()
        entropy = -(probs * logp).sum(-1)
        probs = _top_p(probs, settings.top_p)
        nxt = torch.cat([torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(batch)])
        tokens.append(nxt)
        logps.append(logp.gather(1, nxt[:, None])[:, 0])
        ents.append(entropy)
        stopped = ~finished & torch.isin(nxt, eos)
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
            break
        out = model(**feed)
        past, logits = _cache_of(out), out.logits[:, -1]
    return (torch.stack(tokens, dim=1).cpu(), torch.stack(logps, dim=1).cpu().numpy(),
            torch.stack(ents, dim=1).cpu().numpy(), lengths.cpu().tolist(), finished.cpu().tolist())




def sample_with_hf(config, model, layers: list[int], store_dtype: str, ledger: RunLedger, writes, stop) -> str:
    """Sample, grade and hand over batches until the targets are met, the pairs run out or a stop comes;
    returns 'done' or 'interrupted'. config: the run's GenerateConfig; writes: the store's WriterProcess."""
    budget = CaptureBudget(parse_budget(config.capture_memory) or HF_CAPTURE_BYTES, len(layers),
                           int(model.config.hidden_size), store_dtype, config.max_new_tokens, config.queue_batches)
    capture = BlockCapture(decoder_blocks(model), layers, max_bytes=budget.batch_bytes)
    sampling = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens)
    prompts, pairs = ledger.prompts, ledger.pairs
    batch_size, i = config.batch_size, 0
    try:
        while i < len(pairs):
            if ledger.has_enough():
                return "done"
            if stop():
                return "interrupted"
            chunk = pairs[i : i + batch_size]
            chunk = chunk[: budget.traces_per_batch([len(prompts.ids(p)) for p, _ in chunk])]
            seeds = [trace_seed(config.seed, p.problem_id, s) for p, s in chunk]
            try:
                sampled = sample_batch(model, capture, [prompts.ids(p) for p, _ in chunk], seeds, sampling,
                                       prompts.eos_ids, prompts.pad_id, store_dtype, should_stop=stop)
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



def _host_copy(capture: BlockCapture, store_dtype: str):
    """(words, ready, reused): the batch's captured states as storage words on the host. On a GPU, an
    asynchronous copy into pinned memory (the next batch starts while this one travels; `ready` waits for it);
    on a CPU, the capture buffer itself (`reused`: the next batch overwrites it, so traces copy their part)."""
    hidden = capture.take()  # (layers, batch, positions, d_model) in the storage dtype
    if not hidden.is_cuda:
        return host_words(hidden, store_dtype), no_wait, True
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    stream = torch.cuda.current_stream(hidden.device)
    host.copy_(hidden, non_blocking=True)
    event = torch.cuda.Event()
    event.record(stream)
    return host_words(host, store_dtype), event.synchronize, False
