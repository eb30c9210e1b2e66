"""Capture by teacher forcing: finished traces go through one forward pass of the transformers model, hooks
on the target blocks keep every position's residual, and the log-prob of each sampled token and the entropy
of its sampling distribution come from that forward's logits. Used by `tribunal capture` (recapture.py: re-capture
a store) and by `generate --engine vllm` (vLLM samples, this captures), so both store the same quantities as the hf
engine, which captures while it decodes.

Traces are packed into forward batches by a token budget (longest x traces, right-padded and attention-
masked, sorted by length so padding stays small); the LM head runs on a slice of positions at a time, so the
vocabulary-wide logits of a whole batch never sit in memory. A CUDA out-of-memory halves the budget and
retries the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ...errors import TribunalError
from ...store.format import DTYPES
from ..models import decoder_blocks
from .hooks import host_words

log = logging.getLogger("tribunal.capture")
LOGIT_SLICE = 512  # positions whose vocabulary-wide logits are materialized at once


@dataclass
class ForcedTrace:
    """What teacher forcing gives one trace. activations: (layers, tokens, d_model) in the store's words
    (bfloat16 kept as its 16-bit words); logprobs/entropies: per generated token at the run's temperature;
    raw_logprobs: the same log-probs at temperature 1, to compare with an engine that reports those."""

    activations: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    raw_logprobs: np.ndarray


def tokens_per_batch(capture_memory_bytes: int, layers: int, model_config, compute_bytes: int, store_bytes: int) -> int:
    """Tokens per forward batch within the byte budget: per token, the hooked states and their stacked copy
    (compute dtype) and the store's words on device and host, plus the forward's own working set (the MLP's
    intermediate activations and a few residual-width tensors)."""
    d_model = int(model_config.hidden_size)
    inner = int(getattr(model_config, "intermediate_size", None) or 4 * d_model)
    per_token = layers * d_model * (2 * compute_bytes + 2 * store_bytes) + (2 * inner + 6 * d_model) * compute_bytes
    return max(1, capture_memory_bytes // per_token)


def device_budget_bytes(device) -> int:
    """--capture-memory auto for a teacher-forced capture: half of what the device has free (on a GPU shared with
    vLLM, what vLLM left), 2G on a CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] // 2)
    return 2 << 30


def forcer_for(net, layers, temperature: float, store_dtype: str, budget_bytes: int | None) -> "TeacherForcer":
    """A TeacherForcer on `net`'s decoder blocks, its token budget from --capture-memory (bytes; None: auto)."""
    weights = net.get_input_embeddings().weight
    budget = budget_bytes or device_budget_bytes(weights.device)
    tokens = tokens_per_batch(budget, len(layers), net.config, weights.element_size(), DTYPES[store_dtype][2])
    return TeacherForcer(net, decoder_blocks(net), layers, temperature, store_dtype, tokens)


def length_batches(lengths: list[int], budget_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped so each padded batch (traces x longest) stays within the budget;
    sorted by length, so traces of like length share a batch and padding stays small."""
    batches, batch, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = int(lengths[i])
        if batch and max(longest, n) * (len(batch) + 1) > budget_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        batches.append(batch)
    return batches


class TeacherForcer:
    """Hooks at the target blocks of `net`; `forward(sequences)` -> one ForcedTrace per (token_ids, prompt_length).

    remove() takes the hooks off. Not thread-safe: one forward at a time."""

    def __init__(self, net, blocks, layers, temperature: float, store_dtype: str, budget_tokens: int):
        self.net, self.layers = net, list(layers)
        self.temperature, self.store_dtype, self.budget_tokens = float(temperature), store_dtype, int(budget_tokens)
        self.device = net.get_input_embeddings().weight.device
        self._seen = {}
        self._handles = [blocks[layer].register_forward_hook(self._keep(layer)) for layer in self.layers]

    def _keep(self, layer):
        def hook(module, inputs, output):
            self._seen[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forward(self, sequences: list[tuple[np.ndarray, int]]) -> list[ForcedTrace]:
        """Every sequence through the model in budget-sized batches, results in the input's order."""
        import torch

        results: list[ForcedTrace | None] = [None] * len(sequences)
        pending = length_batches([len(ids) for ids, _ in sequences], self.budget_tokens)
        while pending:
            batch = pending.pop(0)
            try:
                forced = self._forward_batch([sequences[i] for i in batch])
            except torch.OutOfMemoryError:
                self._seen.clear()
                torch.cuda.empty_cache()
                if len(batch) == 1:
                    raise TribunalError("out of memory teacher-forcing a single trace: use a smaller --capture-memory"
                                        " share for vLLM (--vllm-memory), fewer --layers, or put the model on "
                                        "another device (--device-map)") from None
                self.budget_tokens = max(1, self.budget_tokens // 2)
                log.warning("out of memory in the capture forward: halving its token budget to %d", self.budget_tokens)
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                continue
            for i, result in zip(batch, forced):
                results[i] = result
        return results

    def _forward_batch(self, sequences) -> list[ForcedTrace]:
        import torch

        width = max(len(ids) for ids, _ in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for r, (token_ids, _) in enumerate(sequences):
            ids[r, : len(token_ids)] = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
            mask[r, : len(token_ids)] = 1
        with torch.no_grad():
            # the decoder stack alone (transformers' get_decoder): the LM head runs below on slices of positions
            hidden = self.net.get_decoder()(input_ids=ids.to(self.device),
                                            attention_mask=mask.to(self.device)).last_hidden_state
            logprobs, entropies, raw = self._scores(hidden, ids, sequences)
            # every layer's states of the whole batch to the host at once, in the store's words
            states = host_words(torch.stack([self._seen[layer] for layer in self.layers]), self.store_dtype)
        self._seen.clear()
        out, start = [], 0
        for r, (token_ids, p) in enumerate(sequences):
            n = len(token_ids)
            stop = start + n - p
            out.append(ForcedTrace(states[:, r, :n], logprobs[start:stop], entropies[start:stop], raw[start:stop]))
            start = stop
        return out

    def _scores(self, hidden, ids, sequences):
        """Log-probs (at the run's temperature and raw) of each generated token and the entropy at its position,
        flat over the batch's traces in order, the LM head run LOGIT_SLICE positions at a time."""
        import torch

        rows, cols = [], []  # position q-1 of row r predicts token q
        for r, (token_ids, p) in enumerate(sequences):
            q = np.arange(p, len(token_ids))
            rows.append(np.full(len(q), r))
            cols.append(q)
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        total = len(rows)
        logprobs, entropies, raw = (np.full(total, np.nan, np.float32) for _ in range(3))
        predicted = np.flatnonzero(cols > 0)  # a trace without prompt: its first token has no prediction
        head = self.net.get_output_embeddings()
        for lo in range(0, len(predicted), LOGIT_SLICE):
            at = predicted[lo : lo + LOGIT_SLICE]
            r, c = torch.as_tensor(rows[at]), torch.as_tensor(cols[at])
            logits = head(hidden[r.to(hidden.device), (c - 1).to(hidden.device)]).float()
            target = ids[r, c].to(logits.device)[:, None]
            logp = torch.log_softmax(logits / max(self.temperature, 1e-6), dim=-1)
            logprobs[at] = logp.gather(1, target)[:, 0].cpu().numpy()
            # at temperature 1 these are the raw log-probs; otherwise one more pass over the vocabulary
            raw[at] = logprobs[at] if self.temperature == 1 else (
                logits.gather(1, target)[:, 0] - logits.logsumexp(-1)).cpu().numpy()
            entropies[at] = (-(logp.exp() * logp).sum(-1)).cpu().numpy()
        return logprobs, entropies, raw
