"""`tribunal capture`: re-forward the stored traces of a store through the model and write a new store with the
same traces, labels and token arrays and the requested layers, so a user who sampled once can add layers
(or `all`) later without resampling.

Teacher forcing: each trace's stored token ids go through one forward pass; hooks on the target blocks
collect every position's residual; the log-prob of each sampled token and the entropy of its sampling
distribution (at the stored run's temperature, as the generator stores them) come from this forward's
logits, computed a slice of positions at a time so the vocabulary-wide logits of a whole batch never
sit in memory. Traces are packed into forward batches by a token budget (right-padded, attention-masked).
The new store is written through the same writer, so capture resumes after an interruption and stores
each (problem, sample) exactly once.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from ..config import parse_size
from ..errors import TribunalError
from ..store import open_store
from ..store.writer import StoreWriter, TraceRecord
from .stop import GracefulStop

log = logging.getLogger("tribunal.capture")
LOGIT_SLICE = 256  # positions whose vocabulary-wide logits are materialized at once


def capture_store(sources, out, model: str | None = None, layers=None, capture_memory: str = "2G",
                  compute_dtype: str = "auto", device_map: str | None = None, progress: bool = True) -> dict:
    """Write `out`: the traces of `sources` with activations of `layers` re-captured by `model` (default: the
    store's own model when it is on this machine). Returns {'status', 'traces', 'tokens', 'layers'}."""
    from tqdm import tqdm

    from .models import EMBEDDED_MODEL_ID, decoder_blocks, load_model, model_identity, resolve_layers

    with GracefulStop() as stop, open_store(sources) as src:
        spec = model if model is not None else (None if src.model_id == EMBEDDED_MODEL_ID else src.model_id)
        net, tokenizer = load_model(spec, compute_dtype=compute_dtype, device_map=device_map)
        model_id, revision = model_identity(net, spec)
        _refuse_mismatch(src, net, tokenizer, model_id, revision)
        blocks = decoder_blocks(net)
        targets = resolve_layers(layers if layers is not None else list(src.layers), len(blocks))
        settings = src.attrs.get("generation_settings") or {}
        settings = json.loads(settings) if isinstance(settings, str) else dict(settings)
        temperature = float(settings.get("temperature", 1.0))
        writer = StoreWriter(
            out, model_id=model_id, model_revision=revision, layers=targets, d_model=src.d_model, dtype=src.dtype,
            generation_settings={**settings, "captured_by": "tribunal capture (teacher forcing)",
                                 "captured_from": [str(s.path) for s in src.shards]},
            dataset_id=src.attrs.get("dataset_id", ""), dataset_split=src.attrs.get("dataset_split", ""),
            seed=int(src.attrs.get("seed", 0)),
            resume_identity={"captured_from": sorted(str(s.path.resolve()) for s in src.shards)},
            description="Per-token residual-stream activations re-captured by teacher forcing (tribunal capture).")
        row_bytes = len(targets) * src.d_model * 4
        budget = max(1, parse_size(capture_memory) // max(row_bytes * 4, 1))  # tokens per forward batch
        status = "done"
        with writer:
            done = writer.done_keys()
            todo = [i for i in range(src.n_traces)
                    if (int(src.table["problem_id"][i]), int(src.table["sample_index"][i])) not in done]
            device = net.get_input_embeddings().weight.device
            hooks = _Hooks(blocks, targets)
            try:
                bar = tqdm(total=len(todo), desc="capture", unit="trace", disable=not progress)
                for batch in _batches(todo, src.lengths, budget):
                    if stop():
                        status = "interrupted"
                        break
                    traces = [src.trace(i) for i in batch]
                    records = _forward(net, hooks, traces, [int(src.table["seed"][i]) for i in batch], device,
                                       temperature)
                    writer.append(records)
                    bar.update(len(batch))
                bar.close()
            finally:
                hooks.remove()
            if status == "done":
                held = writer.problems_done()
                finished = sorted(p for p in src.problems_done() if p[0] not in held)
                if finished:
                    writer.append([], problems_done=finished)
            return {"status": status, "traces": writer.n_traces, "tokens": writer.n_tokens, "layers": targets,
                    "signal": stop.received}


def _refuse_mismatch(src, net, tokenizer, model_id: str, revision: str) -> None:
    """A model that is not the store's is refused, naming what differs: identity, width, vocabulary, tokenizer."""
    differs = []
    if src.d_model != int(net.config.hidden_size):
        differs.append(f"d_model: store has {src.d_model}, model has {int(net.config.hidden_size)}")
    stored_revision = str(src.attrs.get("model_revision", ""))
    if stored_revision != revision and not (stored_revision == "local" and model_id == src.model_id):
        differs.append(f"model_revision: store has {stored_revision!r}, model has {revision!r}")
    if src.n_traces:
        top = max(int(src.trace(i).token_ids.max()) for i in range(min(src.n_traces, 20)))
        vocab = int(net.get_input_embeddings().weight.shape[0])
        if top >= vocab:
            differs.append(f"vocabulary: the store holds token id {top}, the model has {vocab} embeddings")
        t = src.trace(0)
        gen = [int(x) for x in t.token_ids[t.prompt_length :] if int(x) != tokenizer.eos_token_id]
        if gen and not t.text.startswith(tokenizer.decode(gen[: max(1, len(gen) // 2)], skip_special_tokens=False)):
            differs.append("tokenizer: the stored token ids do not decode to the stored text")
    if differs:
        raise TribunalError(f"the model is not the store's ({'; '.join(differs)}); pass the model that sampled it "
                            "with --model")


def _batches(indices: list[int], lengths, budget_tokens: int):
    """Consecutive traces whose padded batch (traces x longest) stays within the token budget."""
    batch, longest = [], 0
    for i in indices:
        n = int(lengths[i])
        if batch and max(longest, n) * (len(batch) + 1) > budget_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


class _Hooks:
    """Forward hooks that keep each target block's output of the current forward."""

    def __init__(self, blocks, layers):
        self.layers, self.seen = list(layers), {}
        self._handles = [blocks[layer].register_forward_hook(self._keep(layer)) for layer in self.layers]

    def _keep(self, layer):
        def hook(module, inputs, output):
            self.seen[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _forward(net, hooks: _Hooks, traces, seeds, device, temperature: float) -> list[TraceRecord]:
    import torch

    width = max(t.n_tokens for t in traces)
    ids = torch.zeros((len(traces), width), dtype=torch.long)
    mask = torch.zeros((len(traces), width), dtype=torch.long)
    for r, t in enumerate(traces):
        ids[r, : t.n_tokens] = torch.as_tensor(t.token_ids.astype(np.int64))
        mask[r, : t.n_tokens] = 1
    with torch.no_grad():
        # the decoder stack alone (transformers' get_decoder): the LM head runs below on slices of positions
        hidden = net.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        head = net.get_output_embeddings()
        records = []
        for r, (t, seed) in enumerate(zip(traces, seeds)):
            n, p = t.n_tokens, t.prompt_length
            logprobs, entropies = np.zeros(n - p, np.float32), np.zeros(n - p, np.float32)
            for lo in range(max(p, 1), n, LOGIT_SLICE):  # position q-1 predicts token q
                hi = min(n, lo + LOGIT_SLICE)
                logits = head(hidden[r, lo - 1 : hi - 1]).float() / max(temperature, 1e-6)
                logp = torch.log_softmax(logits, dim=-1)
                target = ids[r, lo:hi].to(logp.device)
                logprobs[lo - p : hi - p] = logp.gather(1, target[:, None])[:, 0].cpu().numpy()
                entropies[lo - p : hi - p] = (-(logp.exp() * logp).sum(-1)).cpu().numpy()
            if p == 0 and n:  # a trace without prompt: its first token has no prediction
                logprobs[0] = entropies[0] = np.nan
            acts = np.stack([hooks.seen[layer][r, :n].float().cpu().numpy() for layer in hooks.layers])
            records.append(TraceRecord(
                problem_id=t.problem_id, sample_index=t.sample_index, token_ids=t.token_ids, prompt_length=p,
                activations=acts, label=t.label, text=t.text, predicted=t.predicted, gold=t.gold,
                finish_reason=t.finish_reason, logprobs=logprobs, entropies=entropies,
                seed=seed))
    return records
