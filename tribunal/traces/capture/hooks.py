"""Hook capture at the decoder blocks: forward hooks copy each target block's output (the residual stream
leaving it) into one buffer while the model decodes; a budget bounds how many traces a batch may capture; and
the one conversion of captured states into the store's words (bfloat16 kept as its 16-bit words), which the hf
engine, teacher forcing and the vLLM worker all use, asynchronous from a GPU (host_copy).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ...errors import TribunalError
from ...store.format import DTYPES

log = logging.getLogger("tribunal.generate")


def host_words(states: torch.Tensor, store_dtype: str) -> np.ndarray:
    """`states` as the store's words on the host: converted to the store's dtype where they are (on a GPU, before
    the copy, so fewer bytes travel), bfloat16 viewed as its 16-bit words (numpy has no bfloat16). No copy for
    host states already in that dtype (the array is a view of them)."""
    states = states.to(getattr(torch, store_dtype)).cpu()
    if store_dtype == "bfloat16":
        return states.view(torch.int16).numpy().view(np.uint16)
    return states.numpy()


def host_copy(states: torch.Tensor, store_dtype: str):
    """(words, ready): `states` as the store's words on the host, readable once `ready()` returns (None: at
    once). On a GPU an asynchronous copy, in the store's dtype, into pinned memory, queued on the current
    stream after the work that computed `states`: the host goes on while the rows travel."""
    if not states.is_cuda:
        return host_words(states, store_dtype), None
    states = states.to(getattr(torch, store_dtype))
    host = torch.empty(states.shape, dtype=states.dtype, pin_memory=True)
    host.copy_(states, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(states.device))
    return host_words(host, store_dtype), event.synchronize


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
        self.row_bytes = layers * d_model * DTYPES[store_dtype][2]
        self.max_new_tokens = max_new_tokens
        self.batch_bytes = self.budget_bytes // self.copies  # one rectangle: the capture buffer's ceiling
        self._said = False

    def traces_per_batch(self, prompt_lengths: list[int]) -> int:
        """How many of these traces (in order) fit; at least one, else a TribunalError saying what to change."""
        for n in range(len(prompt_lengths), 0, -1):
            width = max(prompt_lengths[:n]) + self.max_new_tokens
            if n * width * self.row_bytes <= self.batch_bytes:
                if n < len(prompt_lengths) and not self._said:
                    self._said = True
                    log.info(
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

    def column(self, index: int, position: int) -> torch.Tensor:
        """(batch, d_model): the states of layer `self.layers[index]` at one position of this batch, as captured
        (the storage dtype): what the live monitor scores, so its numbers are those of the stored activations."""
        return self._per_layer[index][:, position]

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
