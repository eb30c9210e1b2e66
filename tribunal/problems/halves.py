"""Two halves of a set of problems that differ in kind: questions of few sentences against questions of many.
`run --validate` fits the probes on one half and scores them on the other, both ways: transfer to harder (or
easier) problems of the same dataset. On GSM8K a sentence is about a step of the story; on the embedded problems
the sentences are exactly 2 + the solution's steps, so the halves are its 2-step and 3-step families."""

from __future__ import annotations

import re

import numpy as np

from ..errors import TribunalError

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def sentences(question: str) -> int:
    return len([s for s in _SENTENCE_END.split(question.strip()) if s])


def question_halves(problems) -> list[tuple[str, set[int], str]]:
    """[(name, problem ids, description)] for the short and the long half: questions of at most t sentences and
    of more, with t the cut that splits the problems most evenly. Refused when every question has one length."""
    counts = {p.problem_id: sentences(p.question) for p in problems}
    values = np.array(sorted(counts.values()))
    cuts = [t for t in np.unique(values)[:-1]]
    if not cuts:
        raise TribunalError(f"every question has {values[0] if len(values) else 0} sentences: there are no short and "
                            "long halves to transfer between")
    t = min(cuts, key=lambda c: abs(int((values <= c).sum()) - int((values > c).sum())))
    short = {p for p, n in counts.items() if n <= t}
    return [("short", short, f"questions of at most {t} sentences ({len(short)} problems)"),
            ("long", set(counts) - short, f"questions of more than {t} sentences ({len(counts) - len(short)} problems)")]
