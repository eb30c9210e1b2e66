"""Grade a chain-of-thought trace by its final answer. Stands alone: imports nothing from tribunal.

extract_answer(text) finds the final answer the way a careful reader would:
after the end of thinking (`</think>`) when there is one; the last \\boxed{...}
(nested braces), else the last `#### N`, else the last "the answer is ...",
else the last number. grade(text, gold) compares numerically.
"""

from __future__ import annotations

import re
from fractions import Fraction

LABELS = ("correct", "incorrect", "unparsed")

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})(?:\s*/\s*\d+(?!\d|\.\d))?")
_ANSWER_PHRASE = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=|would\s+be|will\s+be)\s*:?", re.IGNORECASE
)
_HASHES = re.compile(r"####\s*([^\n]*)")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _strip_latex(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf|operatorname)\s*\{([^{}]*)\}", r" \1 ", s)
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"\1/\2", s)
    s = s.replace("\\$", "$").replace("\\%", "%")
    s = re.sub(r"\\[,;:! ]", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = re.sub(r"\\(?:left|right|displaystyle|quad|qquad)", " ", s)
    s = s.replace("{", "").replace("}", "")
    return s


def _to_number(s: str) -> Fraction | None:
    """The number a short answer string states, or None."""
    s = _strip_latex(s)
    s = s.replace("\u2212", "-").replace("$", " ").replace("€", " ").replace("£", " ")
    frac = re.search(r"\(?\s*(-?[\d,]*\.?\d+)\s*\)?\s*/\s*\(?\s*(-?[\d,]*\.?\d+)\s*\)?", s)
    if frac:
        try:
            den = Fraction(frac.group(2).replace(",", ""))
            if den != 0:
                return Fraction(frac.group(1).replace(",", "")) / den
        except ValueError:
            pass
    m = re.search(_NUMBER, s)
    if not m:
        return None
    raw = m.group(0)
    if "," in raw and not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", raw):
        raw = raw.split(",")[0]  # "3, 4 and 5": a list, not a thousands separator
    try:
        return Fraction(raw.replace(",", ""))
    except ValueError:
        return None


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(_strip_latex(text))
    return found[-1] if found else None


def _answer_in(text: str, allow_last_number: bool) -> str | None:
    boxed = [b for b in _boxed_contents(text) if b.strip()]
    if boxed:
        return boxed[-1]
    hashes = [h for h in _HASHES.findall(text) if h.strip()]
    if hashes:
        return hashes[-1]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    for m in reversed(phrases):
        tail = text[m.end() : m.end() + 200].split("\n\n")[0]
        if _to_number(tail) is not None:
            return tail
    if allow_last_number:
        return _last_number(text)
    return None


def extract_answer(text: str, finished: bool = True) -> str | None:
    """The final answer as a canonical number string ("1234", "0.5", "-3"), or None when there is none.

    finished=False (the trace hit the token limit) drops the last-number fallback: a number in
    unfinished reasoning is not an answer. So does unfinished thinking (<think> without </think>).
    """
    if text is None:
        return None
    thinking_open = "<think>" in text and "</think>" not in text
    allow_last = finished and not thinking_open
    candidates = []
    if "</think>" in text:
        candidates.append(text.rsplit("</think>", 1)[1])
    candidates.append(text)
    for part in candidates:
        raw = _answer_in(part, allow_last)
        if raw is None:
            continue
        value = _to_number(raw)
        if value is not None:
            return _canonical(value)
        cleaned = _strip_latex(raw).strip().strip(".").strip()
        if cleaned:
            return cleaned
    return None


def parse_gold(answer: str) -> str:
    """Gold number from a GSM8K answer field (the `#### N` line), canonical."""
    m = _HASHES.findall(answer or "")
    raw = m[-1] if m else answer
    value = _to_number(raw)
    if value is None:
        raise ValueError(f"no gold number in {answer[-80:]!r}: GSM8K answers end with '#### N'")
    return _canonical(value)


def answers_match(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    a, b = _to_number(predicted), _to_number(gold)
    if a is not None and b is not None:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return predicted.strip().lower() == str(gold).strip().lower()


def grade_with_answer(text: str, gold: str, finished: bool = True) -> tuple[str, str | None]:
    """(label, extracted answer), parsing the text once."""
    predicted = extract_answer(text, finished=finished)
    if predicted is None:
        return "unparsed", None
    return ("correct" if answers_match(predicted, gold) else "incorrect"), predicted


def grade(text: str, gold: str, finished: bool = True) -> str:
    """'correct', 'incorrect' or 'unparsed' (no final answer found)."""
    return grade_with_answer(text, gold, finished)[0]
