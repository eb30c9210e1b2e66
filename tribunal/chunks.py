"""Reasoning chunks and their intermediate answers. Stands alone beside grading (imports only it).

A reasoning model thinks in steps and states answers on the way ("so the total is 42. Wait, let me
check..."). `split_chunks` cuts a generated text at paragraph breaks and before reflection cues at
the start of a sentence ("Wait", "Alternatively", "Let me check", ...); `intermediate_answers` gives
each chunk the answer it states (the grading module's extraction applied to the chunk: `\\boxed{}`,
"the answer is", then the last number, e.g. "= 42" ending a step), grades it against the gold, and
merges chunks that state no answer into the next one (Zhang et al. 2025). `token_ends` maps a chunk's
end in the text to the generated token that holds its last character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .grading import THINK_CLOSE, THINK_OPEN, answer_is_correct, canonical_answer, extract_answer_text, is_plain_number

DEFAULT_CUES = ("wait", "but wait", "alternatively", "double-check", "double check", "let me check", "let me verify",
                "let me double-check", "let me recheck", "let me re-check", "verify", "to verify", "hmm", "hold on",
                "on second thought", "actually", "let me think again", "let me reconsider", "check")


@dataclass(frozen=True)
class Chunk:
    """A span [start, end) of the generated text, the answer it states (canonical, or None) and its label."""

    start: int
    end: int
    answer: str | None = None
    label: str | None = None  # "correct" / "incorrect" against the gold; None without an answer


def cue_pattern(cues=DEFAULT_CUES, extra: str | None = None) -> re.Pattern:
    """Where a new chunk starts: a paragraph break, the end of thinking, a cue opening a sentence or a line, or
    `extra` (a regex of your own)."""
    words = "|".join(re.escape(c) for c in sorted(cues, key=len, reverse=True))
    parts = [r"\n\s*\n\s*", rf"(?<={re.escape(THINK_CLOSE)})\s*"]  # paragraphs; the answer after thinking
    if words:
        parts.append(rf"(?:(?<=[.!?:;])\s+|\n\s*)(?=(?:{words})\b)")
    if extra:
        parts.append(f"(?:{extra})")
    return re.compile("|".join(parts), re.IGNORECASE)


def split_chunks(text: str, pattern: re.Pattern | None = None) -> list[Chunk]:
    """Consecutive spans covering the text (no answers yet); a cut lands after the whitespace before a cue."""
    pattern = pattern or cue_pattern()
    cuts = sorted({m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)})
    bounds = [0, *cuts, len(text)]
    return [Chunk(a, b) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def chunk_answer(text: str) -> str | None:
    """The answer a chunk states, as written: the grading module's extraction on the chunk, thinking markers
    removed."""
    clean = text.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ")
    return extract_answer_text(clean, finished=True)


def intermediate_answers(text: str, gold: str, pattern: re.Pattern | None = None) -> list[Chunk]:
    """Chunks that state an answer, each graded; a chunk without one is merged into the next, and trailing
    chunks without an answer are dropped (nothing to grade)."""
    out, start = [], None
    for chunk in split_chunks(text, pattern):
        start = chunk.start if start is None else start
        raw = chunk_answer(text[chunk.start : chunk.end])
        answer = canonical_answer(raw) if is_plain_number(gold) else (raw.strip() if raw else None)
        if not answer:
            continue
        label = "correct" if answer_is_correct(raw, gold) else "incorrect"
        out.append(Chunk(start, chunk.end, answer, label))
        start = None
    return out


def token_ends(pieces: list[str], text: str, char_ends: list[int], decode_prefix=None) -> list[int]:
    """The generated-token index holding the last character of each span ending at `char_ends`.

    pieces: each generated token decoded alone. When they concatenate to the text (the usual case; a
    trailing end-of-sequence piece is allowed), offsets are their running lengths; otherwise (a byte-level
    tokenizer splitting a character across tokens) `decode_prefix(n)` -> the text of the first n tokens is
    searched, a few decodes per span.
    """
    joined = "".join(pieces)
    if joined.startswith(text):
        cumulative, total = [], 0
        for piece in pieces:
            total += len(piece)
            cumulative.append(total)
        return [_first_at_least(cumulative, end) for end in char_ends]
    if decode_prefix is None:
        raise ValueError("the tokens' pieces do not spell the text; pass decode_prefix")
    out = []
    for end in char_ends:
        lo, hi = 0, len(pieces) - 1
        while lo < hi:  # smallest i whose prefix of i + 1 tokens covers `end` characters
            mid = (lo + hi) // 2
            if len(decode_prefix(mid + 1)) >= end:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def _first_at_least(cumulative: list[int], value: int) -> int:
    import bisect

    return min(bisect.bisect_left(cumulative, value), len(cumulative) - 1)
