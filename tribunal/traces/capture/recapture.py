"""`tribunal capture`: re-forward the stored traces of a store through the model and write a new store with the
same traces, labels and token arrays and the requested layers, so a user who sampled once can add layers
(or `all`) later without resampling.

The traces go through teacher_forcing.py (the module `generate --engine vllm` captures with too); the new
store is written through the same writer, so capture resumes after an interruption and stores each
(problem, sample) exactly once.
"""

from __future__ import annotations

import json
import logging

from ...errors import TribunalError
from ...store import open_store
from ...store.writer import StoreWriter, TraceRecord
from ..models import EMBEDDED_MODEL_ID, decoder_blocks, load_model, model_identity, resolve_layers
from ..stop import GracefulStop
from .teacher_forcing import forcer_for

log = logging.getLogger("tribunal.capture")


def recapture_store(sources, out, model: str | None = None, layers=None, capture_memory: int | None = None,
                  compute_dtype: str = "auto", device_map: str | None = None, progress: bool = True) -> dict:
    """Write `out`: the traces of `sources` with activations of `layers` re-captured by `model` (default: the
    store's own model when it is on this machine); capture_memory: bytes per forward batch (None: sized to the device). Returns {'status', 'traces', 'tokens', 'layers'}."""
    from tqdm import tqdm

    with GracefulStop() as stop, open_store(sources) as src:
        if src.interventions:
            path, how = src.interventions[0]
            raise TribunalError(f"{path} was sampled under an intervention ({how.get('kind')} at layer "
                                f"{how.get('layer')}): teacher forcing without it would store states the traces "
                                "were not sampled from; rerun `tribunal steer` with the layers you need instead")
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
        forcer = forcer_for(net, targets, temperature, src.dtype, capture_memory)
        status = "done"
        with writer:
            done = writer.done_keys()
            todo = [i for i in range(src.n_traces)
                    if (int(src.table["problem_id"][i]), int(src.table["sample_index"][i])) not in done]
            try:
                bar = tqdm(total=len(todo), desc="capture", unit="trace", disable=not progress)
                for group in _groups(todo, src.lengths, forcer.budget_tokens):
                    if stop():
                        status = "interrupted"
                        break
                    traces = [src.trace(i) for i in group]
                    forced = forcer.forward([(t.token_ids, t.prompt_length) for t in traces])
                    writer.append([_record(t, f, int(src.table["seed"][i])) for i, t, f in zip(group, traces, forced)])
                    bar.update(len(group))
                bar.close()
            finally:
                forcer.remove()
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


def _groups(indices: list[int], lengths, budget_tokens: int):
    """Consecutive store rows, a few forward batches' worth at a time (one commit each), so an interruption
    loses at most one group and the source is read in order."""
    group, tokens = [], 0
    for i in indices:
        group.append(i)
        tokens += int(lengths[i])
        if tokens >= 4 * budget_tokens:
            yield group
            group, tokens = [], 0
    if group:
        yield group


def _record(trace, forced, seed: int) -> TraceRecord:
    """The stored trace with its re-captured activations, log-probs and entropies."""
    return TraceRecord(
        problem_id=trace.problem_id, sample_index=trace.sample_index, token_ids=trace.token_ids,
        prompt_length=trace.prompt_length, activations=forced.activations, label=trace.label, text=trace.text,
        predicted=trace.predicted, gold=trace.gold, finish_reason=trace.finish_reason, logprobs=forced.logprobs,
        entropies=forced.entropies, seed=seed)
