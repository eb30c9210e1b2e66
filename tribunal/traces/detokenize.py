"""A trace's text while it is sampled, one token at a time: what the live monitor chunks.

The text must be the one the store will hold (Prompts.text: the generated ids decoded together, stop
tokens left out), and a byte-level tokenizer may split a character across tokens. IncrementalText does
what vLLM and TGI do: it decodes a window of the last few ids against the window before them and gives
the difference, holding it back ("") while the window ends in an incomplete character. Byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, R1-Distill) spell a complete token the same alone as in context, so
there each token alone is decoded once per id and reused: a dictionary look-up per token.
"""

from __future__ import annotations

import weakref

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character not complete yet
_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # byte-level tokenizer -> {id: decoded alone}


class IncrementalText:
    """push(token_id) -> the text the token adds; the deltas join to tokenizer.decode(ids without eos_ids,
    skip_special_tokens=False) wherever no character is incomplete, and (with finish()) at the end."""

    def __init__(self, tokenizer, eos_ids):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._ids: list[int] = []  # the non-stop ids
        self._tokens: list[int] = []  # every generated id pushed, stop tokens included
        self._parts: list[str] = []  # the deltas given
        self._length = 0  # characters given
        self._prefix = self._read = 0  # ids[prefix:read] decode to self._prefix_text; text up to read is given
        self._prefix_text = ""
        # per generated token: len(decode(the first i + 1 generated tokens)); None while it held a character back
        # (decoding may then rewrite earlier bytes: SentencePiece's byte fallback), decoded when token_of_char asks
        self._lengths: list[int | None] = []
        self._pieces: dict[int, str] | None = None  # id -> decoded alone, where that is the token's text in context
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ == "ByteLevel" and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._pieces = _PIECES.setdefault(tokenizer, {})

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """The text this generated token adds ("" while it holds part of a character, or for a stop token)."""
        token_id = int(token_id)
        self._tokens.append(token_id)
        if token_id in self.eos_ids:  # counted as a token (its index), not as text
            held = self._read < len(self._ids)
            self._lengths.append(None if held else self._length + len(self._decode([token_id])))
            return ""
        ids = self._ids
        ids.append(token_id)
        if self._pieces is not None and self._read == len(ids) - 1:  # nothing held back: the token alone
            piece = self._pieces.get(token_id)
            if piece is None:
                piece = self._pieces[token_id] = self._decode([token_id])
            if piece and not piece.endswith(REPLACEMENT):
                self._prefix = self._read = len(ids)
                self._prefix_text = ""
                return self._give(piece)
        new = self._decode(ids[self._prefix :])
        delta = new[len(self._prefix_text) :]
        if delta and not new.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(ids)
            self._prefix_text = self._decode(ids[self._prefix : self._read])
            return self._give(delta)
        self._lengths.append(None)
        return ""

    def _give(self, delta: str) -> str:
        self._parts.append(delta)
        self._length += len(delta)
        self._lengths.append(self._length)
        return delta

    def finish(self) -> str:
        """The text held back at the end (replacement characters of a character the trace never completed), so
        that .text equals the whole decode. (Not quite with SentencePiece's byte fallback: decoding a trace cut
        inside a character turns the whole run of byte tokens before it, given already, into replacement
        characters.)"""
        if self._read == len(self._ids):
            return ""
        delta = self._decode(self._ids[self._prefix :])[len(self._prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        self._parts.append(delta)
        self._length += len(delta)
        return delta

    @property
    def text(self) -> str:
        """The deltas given so far, joined."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def __len__(self) -> int:
        """Generated tokens pushed (stop tokens included)."""
        return len(self._lengths)

    def token_of_char(self, char_end: int) -> int:
        """The index of the generated token holding character char_end - 1: the first token whose prefix decodes
        to char_end characters or more (the last if none); the same search as chunks.token_ends."""
        lengths = self._lengths
        if not lengths:
            raise ValueError("no token pushed yet")
        lo, hi = 0, len(lengths) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if lengths[mid] is None:
                lengths[mid] = len(self._decode(self._tokens[: mid + 1]))
            if lengths[mid] >= char_end:
                hi = mid
            else:
                lo = mid + 1
        return lo
