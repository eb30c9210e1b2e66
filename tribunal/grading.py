"""Grade a chain-of-thought trace by its final answer. Stands alone: imports nothing from tribunal.

extract_answer(text) finds the final answer the way a careful reader would.
Golds that are plain numbers (GSM8K) are compared numerically; LaTeX golds (MATH,
AIME: fractions, radicals, intervals, expressions) with Hugging Face's math-verify.
Thinking first: when the prompt opened thinking (R1-Distill chat templates end
the prompt with `<think>\n`, so the text holds `</think>` but no `<think>`) or
the text has `<think>`, only what follows the last `</think>` can answer; a
trace still thinking has no answer, whatever numbers its thinking holds. Then
the last \\boxed{...} (nested braces), else the last `#### N`, else the last
"the answer is ...", else (only for a trace that stopped by itself) the last
number. grade(text, gold) compares numerically.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:[eE][+-]?\d+)?|-?\.\d+"
# A number as it ends a sentence: optionally a mixed number ("2 1/2") or a fraction ("3/5").
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:\d+\s+\d+\s*/\s*\d+(?!\d|\.\d)|(?:{_NUMBER})(?:\s*/\s*\d+(?!\d|\.\d))?)")
_TIME = re.compile(r"(?<![\d.])\d{1,2}:\d{2}(?!\d)")  # 3:30 is a time (or a ratio), not a number; "6: 42" is 42
_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\(?\s*([+-]?\d+)\s*\)?")
_MIXED = re.compile(r"(?<![\d.,/])(-?\d+)\s*\(?\s*(\d+)\s*\)?\s*/\s*\(?\s*(\d+)\s*\)?(?![\d.])")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What a forced answer appends after a chunk (early exit, the trial answers of DEER): thinking ends, the answer opens.
ANSWER_CUE = "\n" + THINK_CLOSE + "\n\nThe answer is \\boxed{"
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
    """The number a short answer string states, or None (also for a time such as 3:30)."""
    s = _strip_latex(s)
    s = s.replace("\u2212", "-").replace("\u2009", " ")
    s = re.sub(r"-\s*[$€£]\s*", "-", s)  # -$5: the sign survives the currency symbol
    s = s.replace("$", " ").replace("€", " ").replace("£", " ")
    if _TIME.search(s):
        return None
    sci = _SCIENTIFIC.search(s)
    if sci:
        return Fraction(sci.group(1)) * Fraction(10) ** int(sci.group(2))
    mixed = _MIXED.search(s)
    if mixed and re.search(r"\d[\s(]", s[mixed.start() : mixed.start(2)]):  # "2 1/2", "2(1)/(2)" from 2\frac12
        whole, num, den = (int(g) for g in mixed.groups())
        if 0 < num < den:
            value = abs(whole) + Fraction(num, den)
            return -value if s[mixed.start()] == "-" else value
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
    if "," in raw and not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:[eE][+-]?\d+)?", raw):
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
    found = _NUMBER_RE.findall(_TIME.sub(" ", _strip_latex(text)))  # the 30 of 3:30 is no answer
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
        if _to_number(tail) is not None or _TIME.match(tail.strip()):
            return tail
    if allow_last_number:
        return _last_number(text)
    return None


def prompt_opens_thinking(prompt: str) -> bool:
    """True when a rendered prompt leaves thinking open (R1-Distill templates end with `<think>\\n`), so the
    generated text is thinking until its `</think>`. Read from the prompt itself, not from a model name."""
    if not prompt or THINK_OPEN not in prompt:
        return False
    return THINK_CLOSE not in prompt[prompt.rindex(THINK_OPEN):]


def answer_region(text: str, thinking: bool = False) -> str | None:
    """The part of a trace that may state its final answer: after the last `</think>` when the trace thinks
    (the prompt opened thinking, or the text has `<think>`); None while it is still thinking."""
    if thinking or THINK_OPEN in text or THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else None
    return text


def extract_answer_text(text: str, finished: bool = True, thinking: bool = False) -> str | None:
    """The final answer as written (a \\boxed{} body, the text after "the answer is", ...), or None.

    thinking: the prompt opened thinking (see prompt_opens_thinking). An answer then counts only after
    `</think>`; a trace with no `</think>` (cut at the token limit mid-thought) has none. finished=False (the
    trace hit the token limit) also drops the last-number fallback: a number in unfinished text is not an answer.
    A trace with no thinking markers and no thinking prompt keeps the plain rules.
    """
    if text is None:
        return None
    region = answer_region(text, thinking)
    if region is None:
        return None
    return _answer_in(region, allow_last_number=finished)


def canonical_answer(raw: str | None) -> str | None:
    """A written answer as a canonical number string ("1234", "0.5", "-3"), else its text without LaTeX markup."""
    if raw is None:
        return None
    value = _to_number(raw)
    if value is not None:
        return _canonical(value)
    cleaned = _strip_latex(raw).strip().strip(".").strip()
    return cleaned or None


def extract_answer(text: str, finished: bool = True, thinking: bool = False) -> str | None:
    """The final answer, canonical (see extract_answer_text for which text counts and canonical_answer for the form)."""
    return canonical_answer(extract_answer_text(text, finished, thinking))


_PLAIN_NUMBER = re.compile(r"\s*-?\s*[$€£]?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)\s*%?\s*")


def is_plain_number(gold: str) -> bool:
    """GSM8K-style golds (numbers) are compared numerically; anything else (LaTeX) by math-verify."""
    return bool(_PLAIN_NUMBER.fullmatch(str(gold)))


def latex_equal(raw: str, gold: str) -> bool:
    """Hugging Face's math-verify on a LaTeX answer and gold: fractions, radicals, intervals, expressions."""
    from math_verify import parse, verify

    wrap = lambda s: s if "$" in s or "\\boxed" in s else f"${s}$"  # noqa: E731
    try:
        return bool(verify(parse(wrap(str(gold))), parse(wrap(str(raw)))))
    except Exception:  # math-verify gives up on some inputs (timeouts, unparsable): not a match
        return False


def answer_is_correct(raw: str | None, gold: str) -> bool:
    """A written answer against the gold: numerically for plain-number golds, by math-verify otherwise."""
    if raw is None:
        return False
    if is_plain_number(gold):
        return answers_match(canonical_answer(raw), gold)
    return latex_equal(raw, gold)


def parse_gold(answer: str) -> str:
    """Gold from an answer field: a GSM8K `#### N` line (canonical number), a plain number, or, for MATH/AIME-style
    answers, the LaTeX as given (a \\boxed{} body when the field is a worked solution)."""
    m = _HASHES.findall(answer or "")
    if m or is_plain_number(str(answer)):
        value = _to_number(m[-1] if m else str(answer))
        if value is None:
            raise ValueError(f"no gold number in {str(answer)[-80:]!r}: GSM8K answers end with '#### N'")
        return _canonical(value)
    boxed = [b for b in _boxed_contents(str(answer)) if b.strip()]
    latex = (boxed[-1] if boxed else str(answer)).strip()
    if not latex:
        raise ValueError("empty answer: give the gold answer ('#### N', a number, or LaTeX such as \\frac{1}{2})")
    return latex


def answers_match(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    a, b = _to_number(predicted), _to_number(gold)
    if a is not None and b is not None:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return predicted.strip().lower() == str(gold).strip().lower()


def grade_with_answer(text: str, gold: str, finished: bool = True, thinking: bool = False) -> tuple[str, str | None]:
    """(label, extracted answer), parsing the text once. The answer is canonical for plain-number golds
    (GSM8K) and as written for LaTeX golds (MATH, AIME), which math-verify compares."""
    raw = extract_answer_text(text, finished=finished, thinking=thinking)
    predicted = canonical_answer(raw) if is_plain_number(gold) else (raw.strip() if raw else None)
    if not predicted:
        return "unparsed", None
    return ("correct" if answer_is_correct(raw, gold) else "incorrect"), predicted


def grade(text: str, gold: str, finished: bool = True, thinking: bool = False) -> str:
    """'correct', 'incorrect' or 'unparsed' (no final answer found)."""
    return grade_with_answer(text, gold, finished, thinking)[0]
