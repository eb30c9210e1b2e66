"""The bookkeeping both sampling engines share, so that an hf run and a vLLM run store the same traces the same
way: each problem's prompt, the (problem, sample) pairs still to sample, grading sampled traces into labels and
the records to store (a label past its target is not stored, unless --keep-all), whether the targets are met,
and the progress bar. The engines only sample; generate.py makes one RunLedger per run and hands it to one.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..grading import grade_with_answer, prompt_opens_thinking
from ..problems.loading import build_prompt
from ..store.writer import TraceRecord


def trace_seed(run_seed: int, problem_id: int, sample_index: int) -> int:
    """A 63-bit seed that depends only on (run seed, problem, sample)."""
    digest = hashlib.blake2b(f"{run_seed}/{problem_id}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def no_wait() -> None:
    """The `ready` of activations already on the host: nothing to wait for."""


@dataclass
class SampledTrace:
    """One sampled trace as an engine hands it to grading."""

    prompt_ids: list
    generated_ids: list
    activations: np.ndarray  # (layers, tokens, d_model): storage words (float16/float32, or bf16 as uint16)
    logprobs: np.ndarray
    entropies: np.ndarray
    finished: bool  # stopped at EOS (else hit max_new_tokens)
    ready: Callable[[], None] = no_wait  # call before reading `activations`: waits for the batch's device-to-host copy
    monitor: dict | None = None  # --monitor: per-token scores over prompt + generated tokens (NaN on the prompt)
    exit: dict | None = None  # --exit-policy: the store's exit record of this trace
    verdict: tuple | None = None  # (label, answer) of a trace that exited with its intermediate answer


class Prompts:
    """The tokenizer's side of a run: each problem's prompt ids (built once), whether the rendered prompt opens
    thinking (R1 templates end with <think>; grading reads it), the ids that end a trace, and a trace's text."""

    def __init__(self, tokenizer, template: str | None, chat_template: bool | None, eos_ids: set[int]):
        self.tokenizer, self.template, self.chat_template = tokenizer, template, chat_template
        self.eos_ids = set(eos_ids)
        self.pad_id = tokenizer.pad_token_id
        self._ids: dict[int, list[int]] = {}
        self._thinking: dict[int, bool] = {}

    def ids(self, problem) -> list[int]:
        if problem.problem_id not in self._ids:
            ids = build_prompt(self.tokenizer, problem.question, self.template, self.chat_template)
            self._ids[problem.problem_id] = ids
            self._thinking[problem.problem_id] = prompt_opens_thinking(
                self.tokenizer.decode(ids, skip_special_tokens=False))
        return self._ids[problem.problem_id]

    def opens_thinking(self, problem) -> bool:
        self.ids(problem)
        return self._thinking[problem.problem_id]

    def text(self, generated_ids) -> str:
        """The generated ids as text, the stop tokens left out."""
        return self.tokenizer.decode([x for x in generated_ids if x not in self.eos_ids], skip_special_tokens=False)


def targets_met(counts: Counter, target: dict) -> bool:
    return all(counts[label] >= n for label, n in target.items())


@dataclass(eq=False)
class RunLedger:
    """One run's bookkeeping. `pairs` are the (problem, sample) pairs still to sample when the run starts: the
    shard's problems the store has not marked done, minus the pairs it holds; `counts` the labels stored (the
    store's and this run's), `graded` every label graded in this run, stored or not. Only grade() changes them."""

    problems: list
    held: dict  # what the store's writer reported when it opened: labels, problems_done, done_keys
    target: dict
    samples_per_problem: int
    keep_all: bool
    prompts: Prompts
    pairs: list = field(init=False)
    counts: Counter = field(init=False)
    graded: Counter = field(default_factory=Counter, init=False)
    new_tokens: int = field(default=0, init=False)
    started: float = field(default_factory=time.time, init=False)

    def __post_init__(self):
        tried, done_pairs = set(self.held["problems_done"]), self.held["done_keys"]
        self.counts = Counter(self.held["labels"])
        self.pairs = [(p, s) for p in self.problems if p.problem_id not in tried
                      for s in range(self.samples_per_problem) if (p.problem_id, s) not in done_pairs]
        # each problem's pairs not yet graded: a problem is done once its last pair is graded, in any order
        self._remaining = Counter(p.problem_id for p, _ in self.pairs)
        self._bar, self._store_path = None, None

    def targets_met(self) -> bool:
        return targets_met(self.counts, self.target)

    def has_enough(self) -> bool:
        """The targets are met and --keep-all is off: nothing more needs sampling."""
        return self.targets_met() and not self.keep_all

    def grade(self, pairs, sampled: list[SampledTrace], seeds) -> tuple[list[TraceRecord], list[tuple[int, int]]]:
        """Grade sampled traces: the records to store (a label past its target is not stored, unless --keep-all),
        and the problems whose last pair this batch held, as (problem_id, samples) for the store."""
        records, finished_problems = [], []
        for (p, s), t, seed in zip(pairs, sampled, seeds):
            text = self.prompts.text(t.generated_ids)
            if t.verdict is not None:  # stopped thinking at its exit chunk: that chunk's answer is the trace's
                (label, predicted), finish = t.verdict, "other"
            else:
                label, predicted = grade_with_answer(text, p.gold, finished=t.finished,
                                                     thinking=self.prompts.opens_thinking(p))
                finish = "stop" if t.finished else "length"
            self.graded[label] += 1
            self.new_tokens += len(t.generated_ids)
            if self.keep_all or label not in self.target or self.counts[label] < self.target[label]:
                self.counts[label] += 1
                records.append(TraceRecord(
                    problem_id=p.problem_id, sample_index=s, token_ids=t.prompt_ids + t.generated_ids,
                    prompt_length=len(t.prompt_ids), activations=t.activations, label=label, text=text,
                    predicted=predicted, gold=p.gold, finish_reason=finish, logprobs=t.logprobs,
                    entropies=t.entropies, seed=seed, monitor=t.monitor, exit=t.exit))
            self._remaining[p.problem_id] -= 1
            if not self._remaining[p.problem_id]:
                finished_problems.append((p.problem_id, self.samples_per_problem))
        return records, finished_problems

    @contextmanager
    def progress(self, desc: str, enabled: bool, store_path):
        """A tqdm bar over the shard's problems while the engine samples; advance() moves it."""
        from tqdm import tqdm

        self._store_path = store_path
        self._bar = tqdm(total=len(self.problems), initial=len(self.held["problems_done"]), desc=desc,
                         unit="problem", disable=not enabled, dynamic_ncols=True)
        try:
            yield self
        finally:
            self._bar.close()
            self._bar, self._store_path = None, None

    def advance(self, finished_problems) -> None:
        """Move the bar past the problems just finished and show the counts, the token rate and the store's size."""
        if self._bar is not None:
            self._bar.update(len(finished_problems))
            self._bar.set_postfix_str(self._postfix())

    def _postfix(self) -> str:
        rate = self.new_tokens / max(time.time() - self.started, 1e-9)
        try:
            size = Path(self._store_path).stat().st_size / 1e6
        except OSError:
            size = float("nan")
        counts = self.counts
        return (f"correct {counts['correct']} incorrect {counts['incorrect']} unparsed {counts['unparsed']} "
                f"| {rate:.0f} tok/s | {size:.1f} MB")
