"""Capture by teacher forcing: finished traces go through one forward pass of the transformers model, hooks
on the target blocks keep every position's residual, and the log-prob of each sampled token and the entropy
of its sampling distribution come from that forward's logits. Used by `tribunal capture` (re-capture a store)
and by `generate --engine vllm` (vLLM samples, this captures), so both store the same quantities as the hf
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

from ..errors import TribunalError

log = logging.getLogger("tribunal.capture")
LOGIT_SLICE = 256  # positions whose vocabulary-wide logits are materialized at once


@dataclass
class ForcedTrace:
    """What teacher forcing gives one trace. activations: (layers, tokens, d_model) in the store's words
    (bfloat16 kept as its 16-bit words); logprobs/entropies: per generated token at the run's temperature;
    raw_logprobs: the same log-probs at temperature 1, to compare with an engine that reports those."""

    activations: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    raw_logprobs: np.ndarray


def tokens_per_batch(capture_memory_bytes: int, layers: int, d_model: int) -> int:
    """Tokens per forward batch: the captured float32 states (layers x d_model a token), the hidden states
    the forward itself holds and the host copies, within the byte budget."""
    return max(1, capture_memory_bytes // max(layers * d_model * 4 * 4, 1))


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
            head = self.net.get_output_embeddings()
            out = []
            for r, (token_ids, p) in enumerate(sequences):
                n = len(token_ids)
                logprobs, entropies, raw = (np.zeros(n - p, np.float32) for _ in range(3))
                for lo in range(max(p, 1), n, LOGIT_SLICE):  # position q-1 predicts token q
                    hi = min(n, lo + LOGIT_SLICE)
                    logits = head(hidden[r, lo - 1 : hi - 1]).float()
                    target = ids[r, lo:hi].to(logits.device)[:, None]
                    raw[lo - p : hi - p] = (logits.gather(1, target)[:, 0] - logits.logsumexp(-1)).cpu().numpy()
                    logp = torch.log_softmax(logits / max(self.temperature, 1e-6), dim=-1)
                    logprobs[lo - p : hi - p] = logp.gather(1, target)[:, 0].cpu().numpy()
                    entropies[lo - p : hi - p] = (-(logp.exp() * logp).sum(-1)).cpu().numpy()
                if p == 0 and n:  # a trace without prompt: its first token has no prediction
                    logprobs[0] = entropies[0] = raw[0] = np.nan
                states = torch.stack([self._seen[layer][r, :n] for layer in self.layers])
                out.append(ForcedTrace(_store_words(states, self.store_dtype), logprobs, entropies, raw))
        self._seen.clear()
        return out


def _store_words(states, store_dtype: str) -> np.ndarray:
    """(layers, tokens, d_model) on the host in the store's dtype (bfloat16 as its 16-bit words)."""
    import torch

    if store_dtype == "bfloat16":
        return states.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return states.to(getattr(torch, store_dtype)).cpu().numpy()
