"""Reasoning chunks and their intermediate answers. Stands alone beside grading (imports only it).

A reasoning model thinks in steps and states answers on the way ("so the total is 42. Wait, let me
check..."). `split_chunks` cuts a generated text at paragraph breaks and before reflection cues at
the start of a sentence ("Wait", "Alternatively", "Let me check", ...); `intermediate_answers` gives
each chunk the answer it states (the grading module's extraction applied to the chunk: `\\boxed{}`,
"the answer is", then the last number, e.g. "= 42" ending a step), grades it against the gold, and
merges chunks that state no answer into the next one (Zhang et al. 2025). `token_ends` maps a chunk's
end in the text to the generated token that holds its last character. `OnlineChunker` finds the same
chunks while the text is generated, each as soon as no continuation of the text could change it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .grading import (THINK_CLOSE, THINK_OPEN, answer_is_correct, answers_match, canonical_answer, extract_answer_text,
                      is_plain_number)

DEFAULT_CUES = ("wait", "but wait", "alternatively", "double-check", "double check", "let me check", "let me verify",
                "let me double-check", "let me recheck", "let me re-check", "verify", "to verify", "hmm", "hold on",
                "on second thought", "actually", "let me think again", "let me reconsider", "check")
_SENTENCE_END = ".!?:;"  # a cue opens a chunk after one of these (or at a line start)
_CUES_OF: dict[re.Pattern, tuple[str, ...]] = {}  # the cues of each pattern cue_pattern built without `extra`
_OPEN_CUE: dict[re.Pattern, re.Pattern | None] = {}  # OnlineChunker's: a cue's first letters ending the text
_AFTER_CLOSE = re.compile(rf"(?<={re.escape(THINK_CLOSE)})", re.IGNORECASE)  # the pattern's lookbehind
_TRIGGER = re.compile(rf"[\s{re.escape(THINK_CLOSE[-1])}]")  # what a delta needs to start a cut


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
        parts.append(rf"(?:(?<=[{_SENTENCE_END}])\s+|\n\s*)(?=(?:{words})\b)")
    if extra:
        parts.append(f"(?:{extra})")
    pattern = re.compile("|".join(parts), re.IGNORECASE)
    if not extra:
        _CUES_OF[pattern] = tuple(cues)
    return pattern


def split_chunks(text: str, pattern: re.Pattern | None = None) -> list[Chunk]:
    """Consecutive spans covering the text (no answers yet); a cut lands after the whitespace before a cue."""
    pattern = pattern or cue_pattern()
    cuts = sorted({m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)})
    bounds = [0, *cuts, len(text)]
    return [Chunk(a, b) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def content_end(text: str, chunk: Chunk) -> int:
    """Where a chunk's content ends: its end less the whitespace before the next chunk (the chunk probe reads
    the token holding the character before it)."""
    return chunk.start + len(text[chunk.start : chunk.end].rstrip())


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
        answer, label = _graded(text[chunk.start : chunk.end], gold)
        if not answer:
            continue
        out.append(Chunk(start, chunk.end, answer, label))
        start = None
    return out


# a trace repeats its answers: the online chunker grades every chunk while the model waits
_canonical, _matches = functools.lru_cache(4096)(canonical_answer), functools.lru_cache(4096)(answers_match)


def _graded(span: str, gold: str | None) -> tuple[str | None, str | None]:
    """(answer, label) of one chunk's text; without a gold the answer is canonical and the label None."""
    raw = chunk_answer(span)
    plain = gold is None or is_plain_number(gold)
    answer = _canonical(raw) if plain else (raw.strip() if raw else None)
    if not answer or gold is None:
        return answer or None, None
    right = _matches(answer, gold) if plain else answer_is_correct(raw, gold)  # the former is the latter's
    return answer, ("correct" if right else "incorrect")


class OnlineChunker:
    """intermediate_answers while the text is generated: feed(delta) returns the answering chunks that became
    final with it, finish() the rest at the end of the text; together they equal intermediate_answers on the
    whole text (the same pattern; default cue_pattern()).

    A cut is final when no continuation could move or remove it: a paragraph break waits for the
    whitespace to end, a cue for enough of its word (and the character after it, for the cue's `\\b`).
    Only the unconfirmed tail is scanned, and a delta with no whitespace and no `>` (the end of `</think>`)
    is not scanned at all unless the tail is waiting on the next characters.
    """

    def __init__(self, gold: str | None, pattern: re.Pattern | None = None):
        self.pattern = pattern or cue_pattern()
        cues = _CUES_OF.get(self.pattern)
        if cues is None or any(not c or c[0].isspace() for c in cues):
            raise ValueError("online chunking needs a pattern from cue_pattern(cues) without `extra`, whose cues "
                             "start with a non-space character: it must know how far a cut's lookahead reads")
        self.gold = gold
        if self.pattern not in _OPEN_CUE:  # a cue's first letters after whitespace, ending the text
            trie = "|".join("".join(f"{re.escape(ch)}(?:" for ch in c[:-1]) + re.escape(c[-1]) + ")?" * (len(c) - 1)
                            for c in cues)
            _OPEN_CUE[self.pattern] = re.compile(rf"(?<=\s)(?:{trie})\Z", re.IGNORECASE) if cues else None
        self._open_cue = _OPEN_CUE[self.pattern]
        self._reach = max((len(c) for c in cues), default=0)
        self._buf, self._base = "", 0  # the text from self._base on (a few characters before the last cut)
        self._pos = 0  # buffer index: every match attempt before it is decided
        self._cut = 0  # text index of the last cut: the current chunk starts there
        self._start = None  # start of the chunks without an answer waiting to merge into the next
        self._pending = False  # the tail waits on the next characters (whitespace, a cue's word, `</think>`)
        self._done = False

    def feed(self, delta: str) -> list[Chunk]:
        """The answering chunks made final by `delta` (often none)."""
        if self._done:
            raise ValueError("feed after finish: start a new OnlineChunker for a new text")
        buf, self._buf = self._buf, ""
        buf += delta  # in place: the buffer's only reference is local
        self._buf = buf
        if not delta or (not self._pending and _TRIGGER.search(delta) is None):
            return []
        return self._scan(final=False)

    def finish(self) -> list[Chunk]:
        """The remaining answering chunks, the text being complete (the last one ends at its end)."""
        if self._done:
            return []
        out = self._scan(final=True)
        self._close(len(self._buf), out)
        self._done = True
        return out

    def _scan(self, final: bool) -> list[Chunk]:
        text, lo, out = self._buf, self._pos, []
        n = len(text)
        while True:
            decided = n + 1 if final else self._first_undecided(text, lo)
            m = self.pattern.search(text, lo) if lo <= n else None
            if m is None or m.start() >= decided:
                break
            if 0 < self._base + m.end() and m.end() < n:
                self._close(m.end(), out)
            lo = m.end() if m.end() > m.start() else m.end() + 1  # an empty match: it starts at a non-space
        if not final:
            self._pos, self._pending = decided, m is not None or decided < n
            if self._cut - self._base > 2 * len(THINK_CLOSE):  # keep the lookbehind's context before the cut
                drop = self._cut - self._base - len(THINK_CLOSE)
                self._buf, self._base, self._pos = self._buf[drop:], self._base + drop, self._pos - drop
        return out

    def _close(self, end: int, out: list[Chunk]) -> None:
        """The chunk from the last cut to buffer index `end` is complete: grade it, merge it or report it."""
        start, self._cut = self._cut, self._base + end
        span = self._buf[start - self._base : end]
        if not span.strip():
            return
        answer, label = _graded(span, self.gold)
        first = start if self._start is None else self._start
        if not answer:
            self._start = first
            return
        out.append(Chunk(first, self._cut, answer, label))
        self._start = None

    def _first_undecided(self, text: str, lo: int) -> int:
        """The first position >= lo whose match attempt the next characters could change (len(text) if none).
        An attempt reads whitespace, then a cue's letters: only the text's last few characters can be undecided."""
        n = k = len(text)
        while k > lo and text[k - 1].isspace():
            k -= 1
        decided = n
        if k < n:  # trailing whitespace: a paragraph break, or the whitespace before a cue, may still grow
            newline = text.find("\n", k)
            decided = k if self._waits(text, k) else (newline if newline >= 0 else n)
        if self._open_cue is None:
            return decided
        at = max(lo, n - self._reach, 1)
        while (m := self._open_cue.search(text, at)) is not None and m.start() < decided:
            r = j = m.start()  # text[r:] begins a cue's word: the whitespace before r may be a cut before it
            while j > lo and text[j - 1].isspace():
                j -= 1
            for q in range(j, r):
                if text[q] == "\n" and "\n" in text[q + 1 : r] or q == j and _AFTER_CLOSE.match(text, q):
                    break  # a paragraph break, or the whitespace after </think>: a cut whatever the word is
                if text[q] == "\n" or q == j and q > 0 and text[q - 1] in _SENTENCE_END:
                    return q  # a cue's lookahead from here reads the unfinished word
            at = r + 1
        return decided

    def _waits(self, text: str, q: int) -> bool:
        """Whether trailing whitespace from q may still become (or stop) a cut: it is a newline, follows a
        sentence end, or follows `</think>`."""
        return text[q] == "\n" or (q > 0 and text[q - 1] in _SENTENCE_END) or _AFTER_CLOSE.match(text, q) is not None


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
