"""DEER's trial answers (Yang et al. 2025, arXiv 2504.15895), offline: at a chunk end of a stored trace, force the
answer and read how sure the model is of the answer it then writes. The strongest training-free rival of the chunk
probe in the early-exit simulation, so it is computed from the same stored prefixes the probe scores.

Each chunk's prompt is the trace's token ids up to and including the chunk's last token, then the ids of the answer
cue (grading.ANSWER_CUE: thinking closes, "The answer is \\boxed{" opens). The cue is tokenized alone and its ids
appended, as a live forced answer appends them to the generated ids; a byte-level BPE may merge characters across
the boundary differently when the joined text is tokenized whole, so these ids are what the model is fed, not
necessarily what tokenizing the text would give. The model then decodes greedily, at most `budget` tokens, until
the \\boxed{ closes or an end-of-sequence token comes.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ...errors import TribunalError
from ...grading import ANSWER_CUE, grade_with_answer
from ..engines.hf import _cache_argument, _cache_of, _left_padded
from ..models import load_model


def store_trial_answers(store, model: str, trace, token_end, progress: bool = False, **load) -> dict:
    """trial_answers with `model` (a local path or hub id) loaded by models.load_model (`load`: its keyword
    arguments), refused when its tokenizer does not spell the store's traces (another model's store)."""
    net, tokenizer = load_model(model, **load)
    if store.n_traces:
        t = store.trace(0)
        gen = [int(x) for x in t.token_ids[t.prompt_length :] if int(x) != tokenizer.eos_token_id]
        vocab = int(net.get_input_embeddings().weight.shape[0])
        spelt = (not gen or max(gen) < vocab) and t.text.startswith(
            tokenizer.decode(gen[: max(1, len(gen) // 2)], skip_special_tokens=False))
        if not spelt:
            raise TribunalError(f"--model {model}: its tokenizer does not spell the store's traces (the store's model "
                                f"is {store.model_id!r}); give the model that sampled them")
    return trial_answers(store, net, tokenizer, trace, token_end, progress=progress)


def trial_answers(store, model, tokenizer, trace, token_end, cue: str = ANSWER_CUE, budget: int = 8,
                  batch_size: int = 16, progress: bool = False) -> dict:
    """DEER's trial answer at each chunk end: rows (trace[j], token_end[j]) name a store trace and the
    generated-token index of the chunk's last token (probes.chunk_probe.load_chunks' rows).

    Returns {"confidence": float array, "answer": list of str or None, "correct": bool array}, aligned with the rows.
    confidence: DEER's default (its `avg1` policy), the arithmetic mean over the tokens written of each step's
    largest next-token probability (greedy decoding, so the probability of the token written), at temperature 1,
    the closing brace's token included; in (0, 1]. answer: the \\boxed{} body, canonical as grading writes it
    (None when the box does not close within `budget` tokens); correct: that answer against the trace's gold.
    """
    trace, token_end = np.asarray(trace, np.int64), np.asarray(token_end, np.int64)
    if trace.shape != token_end.shape:
        raise TribunalError(f"trial answers: {len(trace)} trace indices but {len(token_end)} chunk ends")
    cue_ids = tokenizer.encode(cue, add_special_tokens=False)
    eos = _eos_ids(model, tokenizer)
    prompts, golds = [], []
    for i, end in zip(trace.tolist(), token_end.tolist()):
        t = store.trace(i)
        if not 0 <= end < len(t.token_ids) - t.prompt_length:
            raise TribunalError(f"trace {i} has {len(t.token_ids) - t.prompt_length} generated tokens: no chunk "
                                f"ends at token {end}")
        prompts.append([int(x) for x in t.token_ids[: t.prompt_length + end + 1]] + cue_ids)
        golds.append(t.gold)
    confidence = np.ones(len(prompts))
    answer, correct = [None] * len(prompts), np.zeros(len(prompts), bool)
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch: little padding
    with tqdm(total=len(prompts), desc="trial answers", unit="chunk", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size].tolist()
            bodies, probs = _greedy(model, tokenizer, [prompts[j] for j in rows], budget, eos)
            for j, body, p in zip(rows, bodies, probs):
                confidence[j] = float(np.mean(p))
                if body is not None:
                    label, answer[j] = grade_with_answer(cue + body + "}", golds[j], thinking=True)
                    correct[j] = label == "correct"
            bar.update(len(rows))
    return {"confidence": confidence, "answer": answer, "correct": correct}


def _eos_ids(model, tokenizer) -> set[int]:
    eos = {tokenizer.eos_token_id}
    extra = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(extra if isinstance(extra, (list, tuple)) else [extra])
    eos.discard(None)
    return eos


def _closed_box(text: str) -> str | None:
    """What the answer wrote inside the \\boxed{ the cue opened, or None while the box is open."""
    depth = 1
    for k, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[:k]
    return None


@torch.no_grad()
def _greedy(model, tokenizer, prompts: list[list[int]], budget: int, eos: set[int]):
    """Greedy decoding of left-padded prompts with the KV cache, each row until its box closes, an end of sequence
    or `budget` tokens. Returns, per prompt, the box's body (None if it never closed) and the top probability of
    each step it decoded."""
    device = model.get_input_embeddings().weight.device
    ids, mask, _ = _left_padded(prompts, tokenizer.pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    written, probs = [[] for _ in prompts], [[] for _ in prompts]
    bodies = [None] * len(prompts)
    open_rows = set(range(len(prompts)))
    for _ in range(budget):
        top, nxt = torch.softmax(out.logits[:, -1].float(), dim=-1).max(dim=-1)
        tokens, tops = nxt.tolist(), top.tolist()
        for r in sorted(open_rows):
            token = tokens[r]
            probs[r].append(tops[r])
            if token in eos:
                open_rows.discard(r)
                continue
            written[r].append(token)
            bodies[r] = _closed_box(tokenizer.decode(written[r], skip_special_tokens=True))
            if bodies[r] is not None:
                open_rows.discard(r)
        if not open_rows:
            break
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_arg: _cache_of(out)})
    return bodies, probs
