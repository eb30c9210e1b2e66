"""The saved directions at work while the hf engine samples: a live monitor and early exit.

`--monitor PROBES_DIR` scores every generated token with the token direction and every chunk end that
states an answer with the chunk direction, from the states the capture hooks already hold (the probe's
layer is captured whether or not it is stored), so `tribunal score` on the stored activations gives the
same numbers. Chunk ends are found online by tribunal.chunks' rules (OnlineChunker over the text as
IncrementalText builds it), which only confirm a cut a few characters after the chunk's content ends.

`--exit-policy PROBES_DIR` acts on those scores: at an answering chunk end where the rule fires (the chunk
probe's probability, or the output confidence over the chunk, at or above the threshold), the trace stops
thinking there. The tokens sampled past the chunk's last token while its cut was confirmed are dropped
(the attention mask hides them from what follows, and positions continue from the chunk's end). With
`--exit-answer intermediate` the chunk's answer is the trace's; with `forced` the engine appends
grading.ANSWER_CUE and lets the model write its answer within `--exit-answer-budget` tokens.

This module is the one bridge between the generator and the probes' results: it reads the directions
file and resolves thresholds through probes/exit_policy.py, and nothing in probes imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..chunks import DEFAULT_CUES, OnlineChunker, content_end, cue_pattern
from ..errors import TribunalError
from ..grading import ANSWER_CUE, prompt_opens_thinking
from ..probes import directions as saved
from ..probes.exit_policy import resolve_threshold
from .detokenize import IncrementalText

TOKEN_DIRECTION = "lda"  # of the token probe's two directions, the one the monitor scores with


@dataclass(frozen=True)
class Directions:
    """The monitor's linear read-outs: chunk logit = chunk_weights . x + chunk_bias at the chunk probe's layer,
    token score = token_weights . x - token_offset at the token probe's layer (either may be absent)."""

    probes: str
    cues: tuple  # the reflection cues the chunk probe's chunks were cut at (chunks.cue_pattern)
    chunk_layer: int | None
    chunk_weights: np.ndarray | None
    chunk_bias: float
    token_layer: int | None
    token_weights: np.ndarray | None
    token_offset: float

    @property
    def layers(self) -> list[int]:
        return sorted({x for x in (self.chunk_layer, self.token_layer) if x is not None})

    def settings(self) -> dict:
        return {"probes": self.probes, "cues": list(self.cues), "chunk_layer": self.chunk_layer,
                "token_layer": self.token_layer,
                "token_direction": TOKEN_DIRECTION if self.token_layer is not None else None}


def load_directions(probes_dir, model_id: str, d_model: int, n_layers: int, need_chunk: bool = False) -> Directions:
    """The chunk and token directions of a probes folder, refused when they come from another model or width."""
    doc = saved.load(probes_dir)
    prov = doc.get("provenance", {})
    where = f"the probes in {probes_dir}"
    if prov.get("model") != model_id:
        raise TribunalError(f"{where} were fit on model {prov.get('model')!r}, this run samples {model_id!r}")
    if int(prov.get("d_model", -1)) != int(d_model):
        raise TribunalError(f"{where} have d_model {prov.get('d_model')}, the model {d_model}")
    chunk, token = doc.get("chunk"), doc.get("token")
    if need_chunk and not chunk:
        raise TribunalError(f"{where} have no chunk probe: run `tribunal probe chunks` on the probing store first")
    if not chunk and not token:
        raise TribunalError(f"{where} have neither a chunk nor a token probe: run `tribunal probe chunks` "
                            "(and `tribunal probe tokens`) first")
    for part, layer in (("chunk", chunk and chunk["direction"]["layer"]), ("token", token and token["layer"])):
        if layer is not None and not (0 <= int(layer) < n_layers and int(layer) in prov.get("layers", [layer])):
            raise TribunalError(f"{where}: the {part} probe's layer {layer} is not among the probing store's layers "
                                f"{prov.get('layers')} within the model's {n_layers}")
    chunking = (chunk or {}).get("chunking", {"cues": list(DEFAULT_CUES), "extra": None})
    if chunking.get("extra"):
        raise TribunalError(f"{where}: the chunk probe was fit with --chunk-regex {chunking['extra']!r}, which online "
                            "chunking cannot follow (it cannot know how far a regex reads ahead); refit it with "
                            "--cues only")
    cw = cb = tw = to = None
    if chunk:
        d = chunk["direction"]
        cw = float(d["weight_norm"]) * np.asarray(d["direction"], np.float64)
        cb = float(d["bias"])
    if token:
        tw = np.asarray(token["directions"][TOKEN_DIRECTION]["direction"], np.float64)
        to = float(tw @ np.asarray(token["midpoint"], np.float64))
    # the resolved path: the store's resume identity holds it, however a requeued task spells it
    return Directions(str(Path(probes_dir).resolve()), tuple(chunking["cues"]),
                      chunk and int(chunk["direction"]["layer"]), cw, cb or 0.0, token and int(token["layer"]), tw,
                      to or 0.0)


@dataclass(frozen=True)
class ExitPolicy:
    """When a trace stops thinking and how it answers."""

    rule: str
    threshold: float  # fires at score >= threshold; inf never fires
    threshold_spec: str
    threshold_how: dict
    answer: str
    answer_budget: int
    cue_ids: tuple = ()

    def fires(self, score: float) -> bool:
        return score >= self.threshold

    def settings(self, probes: str) -> dict:
        return {"probes": probes, "rule": self.rule, "threshold_spec": self.threshold_spec,
                "threshold": self.threshold if math.isfinite(self.threshold) else None,
                "threshold_how": self.threshold_how, "answer": self.answer,
                "answer_cue": ANSWER_CUE if self.answer == "forced" else None,
                "answer_budget": self.answer_budget if self.answer == "forced" else None}


def load_policy(config, tokenizer, prompt_text: str) -> ExitPolicy:
    """The run's exit policy from its options; refuses a forced answer where the prompt does not open thinking
    (the template has no end-of-thinking marker to append)."""
    if config.exit_answer == "forced" and not prompt_opens_thinking(prompt_text):
        raise TribunalError("--exit-answer forced needs a prompt that opens thinking (a template ending with "
                            "<think>): this run's prompt has no end-of-thinking marker to append; use "
                            "--exit-answer intermediate")
    tau, how = resolve_threshold(config.exit_threshold, Path(config.exit_policy), config.exit_rule, config.exit_answer)
    tau = math.inf if tau is None else float(tau)
    cue = tuple(tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]) if config.exit_answer == "forced" else ()
    return ExitPolicy(config.exit_rule, tau, str(config.exit_threshold), how, config.exit_answer,
                      int(config.exit_answer_budget), cue)


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0


@dataclass(eq=False)
class TraceWatch:
    """One trace's online state: its text, its chunker, the scores of its generated tokens and, once the rule
    fired, the exit. Steps index the decode loop (one token each); `kept` are the steps the trace keeps."""

    text: IncrementalText
    chunker: OnlineChunker | None
    chunk_logit: list = field(default_factory=list)
    token_score: list = field(default_factory=list)
    logprob: list = field(default_factory=list)
    chunk_probability: dict = field(default_factory=dict)  # generated-token index -> probability
    chunk_ends: list = field(default_factory=list)  # answering chunks' last tokens, in order
    exit: dict | None = None
    forcing: list = field(default_factory=list)  # cue tokens still to feed
    answer_steps: list = field(default_factory=list)  # steps of the forced answer (cue included)

    @property
    def thinking(self) -> bool:
        return self.exit is None


@dataclass(frozen=True)
class Watching:
    """A run's monitor: its directions, its exit policy (None: monitor only) and what reads the text."""

    directions: Directions
    policy: ExitPolicy | None
    tokenizer: object
    eos_ids: frozenset

    @property
    def layers(self) -> list[int]:
        return self.directions.layers

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-token scores the store holds (its /monitor datasets)."""
        return tuple(name for name, layer in (("chunk_probability", self.directions.chunk_layer),
                                              ("token_score", self.directions.token_layer)) if layer is not None)

    def batch(self, golds: list) -> "BatchWatch":
        return BatchWatch(self.directions, self.policy, self.tokenizer, self.eos_ids, golds)

    def settings(self) -> dict:
        out = {"monitor": self.directions.settings()}
        if self.policy is not None:
            out["exit_policy"] = self.policy.settings(self.directions.probes)
        return out


class BatchWatch:
    """The monitor and the exit policy over one batch: the engine calls `force` before it samples a step,
    `observe` once the step's token has been fed (its states captured), and `finish` at the end."""

    def __init__(self, directions: Directions, policy: ExitPolicy | None, tokenizer, eos_ids, golds: list):
        self.directions, self.policy = directions, policy
        pattern = cue_pattern(directions.cues)
        self.rows = [TraceWatch(IncrementalText(tokenizer, eos_ids),
                                OnlineChunker(gold, pattern) if directions.chunk_layer is not None else None)
                     for gold in golds]

    def force(self, step: int, active) -> list[tuple[int, int]]:
        """(row, token) pairs to feed this step instead of a sample: the answer cue of traces that exited. Every
        step of an exited trace that is still active is a step of its answer."""
        out = []
        for i in active:
            row = self.rows[i]
            if row.exit is not None:
                row.answer_steps.append(step)
                if row.forcing:
                    out.append((i, row.forcing.pop(0)))
        return out

    def answer_done(self, i: int) -> bool:
        """The forced answer of trace i has used its budget (the cue, then `answer_budget` tokens)."""
        row = self.rows[i]
        return row.exit is not None and len(row.answer_steps) >= len(self.policy.cue_ids) + self.policy.answer_budget

    def observe(self, step: int, rows, tokens, chunk_logits, token_scores, logprobs) -> list:
        """Take each row's token of this step; returns [(row, exit chunk's last token, answer mode)] for rows
        where the rule fired (the engine stops them, or starts their forced answer)."""
        fired = []
        for j, i in enumerate(rows):
            row = self.rows[i]
            if not row.thinking:
                row.token_score.append(token_scores[j])
                continue
            row.chunk_logit.append(chunk_logits[j])
            row.token_score.append(token_scores[j])
            row.logprob.append(logprobs[j])
            delta = row.text.push(int(tokens[j]))
            if row.chunker is None or not delta:
                continue
            end = self._chunks(row, row.chunker.feed(delta))
            if end is not None:
                fired.append((i, end))
        for i, end in fired:
            self._exit(i, end, step)
        return fired

    def finish(self, i: int) -> None:
        """The trace ended by itself (end of sequence or the token limit): its last chunk is final now."""
        row = self.rows[i]
        if row.thinking and row.chunker is not None:
            tail = row.text.finish()  # a character the last tokens left incomplete
            self._chunks(row, (row.chunker.feed(tail) if tail else []) + row.chunker.finish(), act=False)

    def _chunks(self, row: TraceWatch, chunks, act: bool = True) -> int | None:
        """Score each newly final answering chunk at its last token; the first where the rule fires ends thinking."""
        for chunk in chunks:
            start = row.chunk_ends[-1] + 1 if row.chunk_ends else 0
            end = max(row.text.token_of_char(content_end(row.text.text, chunk)), start)
            row.chunk_ends.append(end)
            probability = _sigmoid(row.chunk_logit[end])
            row.chunk_probability[end] = probability
            if act and self.policy is not None:
                score = probability if self.policy.rule == "probe" else math.exp(
                    float(np.nanmean(row.logprob[start : end + 1])))
                if self.policy.fires(score):
                    row.exit = {"exit_chunk": len(row.chunk_ends) - 1, "rule": self.policy.rule, "score": score,
                                "token": end, "answer": chunk.answer, "label": chunk.label}
                    return end
        return None

    def _exit(self, i: int, end: int, step: int) -> None:
        row = self.rows[i]
        row.exit["decided_at"] = step
        if self.policy.answer == "forced":
            row.forcing = list(self.policy.cue_ids)

    def kept_steps(self, i: int, length: int) -> list[int] | None:
        """The decode steps trace i keeps (None: all of its `length`): up to the exit chunk's last token, then the
        forced answer's steps."""
        row = self.rows[i]
        if row.exit is None:
            return None
        return list(range(row.exit["token"] + 1)) + [s for s in row.answer_steps if s < length]

    def record(self, i: int, prompt_length: int, kept: int) -> tuple[dict | None, dict | None]:
        """(monitor arrays over the stored tokens, the exit record) of trace i, which keeps `kept` generated tokens."""
        row = self.rows[i]
        n = prompt_length + kept
        monitor = {}
        if self.directions.chunk_layer is not None:
            chunk = np.full(n, np.nan, np.float32)
            for t, p in row.chunk_probability.items():
                if t < kept:
                    chunk[prompt_length + t] = p
            monitor["chunk_probability"] = chunk
        if self.directions.token_layer is not None:
            token = np.full(n, np.nan, np.float32)
            scores = row.token_score
            if row.exit is not None:  # the steps kept, in order: thinking up to the exit, then the answer
                kept_scores = scores[: row.exit["token"] + 1] + [scores[s] for s in row.answer_steps if s < len(scores)]
            else:
                kept_scores = scores
            token[prompt_length : prompt_length + min(kept, len(kept_scores))] = kept_scores[:kept]
            monitor["token_score"] = token
        if self.policy is None:
            return monitor, None
        if row.exit is None:
            return monitor, {"exit_chunk": -1, "rule": "none", "score": float("nan"), "thinking_tokens": kept,
                             "forced_tokens": 0}
        thinking = row.exit["token"] + 1
        return monitor, {"exit_chunk": row.exit["exit_chunk"], "rule": row.exit["rule"],
                         "score": float(row.exit["score"]), "thinking_tokens": thinking,
                         "forced_tokens": kept - thinking}

    def intermediate(self, i: int) -> tuple[str, str] | None:
        """(label, answer) of a trace that exited with --exit-answer intermediate: its exit chunk's."""
        row = self.rows[i]
        if row.exit is None or self.policy.answer != "intermediate":
            return None
        return row.exit["label"], row.exit["answer"]
