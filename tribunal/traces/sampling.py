"""Batched sampling with the KV cache, capturing the residual stream of target layers for every token.

tribunal runs its own decode loop instead of `generate()` because it needs, per
trace: its own random generator (seeded from run seed, problem and sample, so a
resumed or sharded run samples the same traces), the log-prob and entropy of
each sampled token, and the hidden state leaving each target block at every
position, prompt included. Forward hooks on the decoder blocks collect those
states on the device; they go to the host once per batch, asynchronously.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import numpy as np
import torch


def trace_seed(run_seed: int, problem_id: int, sample_index: int) -> int:
    """A 63-bit seed that depends only on (run seed, problem, sample)."""
    digest = hashlib.blake2b(f"{run_seed}/{problem_id}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Interrupted(Exception):
    """A stop was requested while a batch was in flight; the batch is dropped whole."""


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512


@dataclass
class SampledTrace:
    prompt_ids: list
    generated_ids: list
    activations: np.ndarray  # (layers, tokens, d_model): storage words (float16/float32, or bf16 as uint16)
    logprobs: np.ndarray
    entropies: np.ndarray
    finished: bool  # stopped at EOS (else hit max_new_tokens)
    ready: object = None  # call before reading `activations`: waits for the batch's device-to-host copy


HF_CAPTURE_BYTES = 8 << 30  # --capture-memory auto for this engine


class CaptureBudget:
    """How many traces a batch may hold so that captured activations stay within `budget_bytes`.

    A batch's capture is a rectangle: layers x traces x (longest prompt + max new tokens) x d_model in the
    storage dtype. Held at once, at worst: the device buffer, the batch being handed over, the one pending
    until its copy lands, the one on the wire and `queue_batches` waiting for the writer (on a GPU the last
    four are pinned host copies). The budget covers all of them, device and host together.
    """

    def __init__(self, budget_bytes: int, layers: int, d_model: int, store_dtype: str, max_new_tokens: int,
                 queue_batches: int):
        self.budget_bytes = int(budget_bytes)
        self.copies = queue_batches + 4
        self.row_bytes = layers * d_model * _STORAGE_DTYPES[store_dtype].itemsize
        self.max_new_tokens = max_new_tokens
        self.batch_bytes = self.budget_bytes // self.copies  # one rectangle: the capture buffer's ceiling
        self._said = False

    def traces_per_batch(self, prompt_lengths: list[int]) -> int:
        """How many of these traces (in order) fit; at least one, else a TribunalError saying what to change."""
        from ..errors import TribunalError

        for n in range(len(prompt_lengths), 0, -1):
            width = max(prompt_lengths[:n]) + self.max_new_tokens
            if n * width * self.row_bytes <= self.batch_bytes:
                if n < len(prompt_lengths) and not self._said:
                    self._said = True
                    import logging

                    logging.getLogger("tribunal.generate").info(
                        "--capture-memory %.2g GB holds %d traces per batch (%d copies of %d x %d tokens x %d bytes)",
                        self.budget_bytes / 1e9, n, self.copies, n, width, self.row_bytes)
                return n
        one = (max(prompt_lengths[:1]) + self.max_new_tokens) * self.row_bytes * self.copies
        raise TribunalError(
            f"--capture-memory {self.budget_bytes / 2**20:.0f}M holds no trace: one trace of up to "
            f"{prompt_lengths[0] + self.max_new_tokens} tokens needs {one / 2**20:.0f}M ({self.copies} copies of "
            f"tokens x layers x d_model); raise --capture-memory, or lower --max-new-tokens or --layers")


class _DeepestLayerDone(Exception):
    """Raised by the deepest target block's hook to end a forward whose logits nobody needs."""


class BlockCapture:
    """Forward hooks that copy each target block's output hidden states into a batch buffer.

    One buffer, in the storage dtype, reused from batch to batch (grown when a batch needs more),
    and every forward's states copied into it as they come, so no output tensor of the model is
    kept: capture holds one storage-dtype copy of the batch (on a GPU, less than keeping the
    compute-dtype outputs to concatenate later), and on a CPU no multi-MB buffer is allocated and
    freed per batch around the model's own allocations (glibc maps and unmaps those: page faults).
    A decode step costs a narrow and a copy per layer.
    """

    def __init__(self, blocks, layers, max_bytes: int | None = None):
        self.layers = list(layers)
        self.max_bytes = max_bytes  # a grown buffer never exceeds this (the capture budget's one rectangle)
        self._stop_at = None
        self._rows = None
        self._buffer = None
        self.start(0, 0, torch.float32, "cpu")
        self._handles = [blocks[layer].register_forward_hook(self._hook(i, layer))
                         for i, layer in enumerate(self.layers)]

    def start(self, batch: int, positions: int, dtype: torch.dtype, device) -> None:
        """Begin a batch of `batch` sequences of at most `positions` tokens, captured in `dtype` on `device`
        (the first hook, which knows d_model, sizes the buffer); drops anything captured before. The
        first forward after `start` is the prompt's. What `take` returned before is overwritten."""
        self._shape, self._dtype, self._device = (batch, positions), dtype, torch.device(device)
        self._view = None
        self._per_layer = None  # self._view[i] for each layer, made once per batch
        self._filled = [0] * len(self.layers)

    def _batch_view(self, d_model: int) -> torch.Tensor:
        """This batch's (layers, batch, positions, d_model) part of the buffer, growing it if needed."""
        want = (len(self.layers), *self._shape, d_model)
        old = self._buffer
        if old is None or old.dtype != self._dtype or old.device != self._device or old.shape[-1] != d_model:
            size = want
        elif old.shape[1] < want[1] or old.shape[2] < want[2]:
            size = tuple(max(w, have) for w, have in zip(want, old.shape))
            if self.max_bytes and np.prod(size) * old.element_size() > self.max_bytes:
                size = want  # the union of two shapes may exceed the budget that each fits
        else:
            return old[:, : want[1], : want[2]]
        self._buffer = old = None  # freed before its successor is allocated
        self._buffer = torch.empty(size, dtype=self._dtype, device=self._device)
        return self._buffer[:, : want[1], : want[2]]

    def _hook(self, index: int, layer: int):
        def hook(module, inputs, output):
            if not self._shape[1]:  # no batch started: the model runs for something else
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            at = self._filled[index]
            if self._view is None:  # the prompt's forward, first target block
                self._view = self._batch_view(hidden.shape[-1])
                self._per_layer = self._view.unbind(0)
            target = self._per_layer[index].narrow(1, at, hidden.shape[1])
            if self._rows is None:
                target.copy_(hidden)
            else:  # the last forward, over some rows of the batch only
                target[self._rows.to(self._device)] = hidden.to(self._device, self._dtype)
            self._filled[index] = at + hidden.shape[1]
            if layer == self._stop_at:
                raise _DeepestLayerDone()

        return hook

    def capture_only(self, model, inputs: dict, rows: torch.Tensor | None = None) -> None:
        """Run model(**inputs) just deep enough to capture every target layer (the blocks above them,
        the final norm and the LM head are skipped): for the last sampled token, whose logits are unused.

        rows: the batch rows `inputs` holds, when it holds only some of the batch (the other rows'
        states at this position are left as they were: they lie beyond the end of their traces)."""
        self._stop_at, self._rows = max(self.layers), rows
        try:
            model(**inputs)
        except _DeepestLayerDone:
            pass
        finally:
            self._stop_at = self._rows = None

    def take(self) -> torch.Tensor:
        """(layers, batch, positions, d_model) in the storage dtype: everything captured since `start`,
        a view of the buffer, valid until the next `start`."""
        if len(set(self._filled)) != 1 or self._view is None:
            raise RuntimeError(f"capture is incomplete: positions per layer {self._filled}")
        return self._view[:, :, : self._filled[0]]

    def release(self) -> None:
        """Free the buffer (after an out-of-memory, before the allocator's cache is emptied)."""
        self._buffer = self._view = self._per_layer = None

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _no_wait():
    return None


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


_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def sample_batch(model, capture: BlockCapture | None, prompts: list[list[int]], seeds: list[int],
                 settings: SamplingSettings, eos_ids: set[int], pad_id: int, store_dtype: str = "float16",
                 should_stop=lambda: False) -> list[SampledTrace]:
    """Sample one continuation per prompt. capture=None samples without capturing (the benchmark's baseline)."""
    device = model.get_input_embeddings().weight.device
    ids, mask, width = _left_padded(prompts, pad_id, device)
    if capture is not None:  # drops what an interrupted batch left
        capture.start(len(prompts), width + settings.max_new_tokens, _STORAGE_DTYPES[store_dtype], device)
    gen, logps, ents, lengths, finished = _decode(model, capture, ids, mask, seeds, settings, eos_ids, should_stop)
    words, ready, reused = (None, _no_wait, False) if capture is None else _host_words(capture, store_dtype)
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


def _host_words(capture: BlockCapture, store_dtype: str):
    """(words, ready, reused): the batch's captured states as storage words on the host. On a GPU, an
    asynchronous copy into pinned memory (the next batch starts while this one travels; `ready` waits for it);
    on a CPU, the capture buffer itself (`reused`: the next batch overwrites it, so traces copy their part)."""
    hidden = capture.take()  # (layers, batch, positions, d_model) in the storage dtype
    if store_dtype == "bfloat16":
        hidden = hidden.view(torch.int16)  # numpy has no bfloat16: the store keeps its 16-bit words
    ready, reused = _no_wait, False
    if hidden.is_cuda:
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        stream = torch.cuda.current_stream(hidden.device)
        host.copy_(hidden, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        hidden, ready = host, event.synchronize
    else:
        reused = True
    words = hidden.numpy()
    return (words.view(np.uint16) if store_dtype == "bfloat16" else words), ready, reused
