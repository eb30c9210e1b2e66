"""Synthetic GSM8K-style multi-step word problems: the embedded model's training data and default dataset.

Each problem is a short story of 2-3 additions, subtractions and doublings, with a GSM8K-format worked
answer ending in `#### N`, and the R1-shaped trace the embedded model is trained to write after a prompt
that ends with `<think>\\n`: one paragraph per step, each stating its result ("He gives away 3, so 8-3=5.");
in some traces a slip (a wrong result) that a reflection ("Wait, 8-3 is 5, not 6.") corrects; in some a
re-check of a final result that was already right (the overthinking early exit cuts); then `</think>` and
the answer in `\\boxed{}` (grading.ANSWER_CUE + "N}."), so tribunal.chunks finds graded chunks with
right and wrong intermediate answers. Deterministic in the seed: questions are drawn from one stream, the
trace's style from another, so the questions of a seed do not depend on the recipe.
"""

from __future__ import annotations

import random

from ..grading import ANSWER_CUE

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Amy", "Tom", "Eva", "Jay", "Liz", "Ray", "Kim", "Dan"]
ITEMS = ["apples", "marbles", "books", "coins", "stickers", "cookies", "pencils", "shells", "cards", "stamps"]
PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Ivy", "Amy", "Eva", "Liz", "Kim"} else "He") for n in NAMES}
# The recipe, recorded in the embedded model's TRAINING.json.
RECIPE = {"slip": 0.25, "slip_in_same_paragraph": 0.5, "recheck": 0.3, "steps": [2, 3]}


def _slip(rng: random.Random, right: int) -> int:
    """A plausible wrong result: off by one or two, never negative, never the right one."""
    wrong = right + rng.choice([-2, -1, 1, 1, 2])
    return wrong if wrong >= 0 and wrong != right else right + 1


def _trace(steps: list[tuple[str, str, int]], name: str, item: str, start: int, style: random.Random) -> str:
    """The thinking after `<think>\\n` and the boxed answer; steps are (clause, expression, result)."""
    paragraphs = [f"{name} starts with {start} {item}."]
    slip_at = style.randrange(len(steps)) if style.random() < RECIPE["slip"] else None
    for i, (clause, expr, result) in enumerate(steps):
        if i == slip_at:
            wrong = _slip(style, result)
            fix = f"Wait, {expr} is {result}, not {wrong}. So {clause.split()[0].lower()} has {result}."
            said = f"{clause}, so {expr}={wrong}."
            if style.random() < RECIPE["slip_in_same_paragraph"]:
                paragraphs.append(f"{said} {fix}")
            else:
                paragraphs += [said, fix]
        else:
            paragraphs.append(f"{clause}, so {expr}={result}.")
    if style.random() < RECIPE["recheck"]:
        _, expr, result = steps[-1]
        paragraphs.append(f"Let me check: {expr}={result}. Yes, {result}.")
    return "\n\n".join(paragraphs) + ANSWER_CUE + f"{steps[-1][2]}}}."


def make_problem(rng: random.Random, style: random.Random | None = None) -> dict:
    """One problem from rng; its trace's slips and re-checks from style (default: seeded by the question)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    he = PRONOUN[name]
    start = value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    worked = [f"{name} starts with {value} {item}."]
    steps = []
    for i in range(rng.randint(2, 3)):
        lead = "Then " + he.lower() if i else he
        kind = rng.choice(["add", "add", "sub", "sub", "double"])
        if kind == "double" and value <= 25:
            new = value * 2
            sentences.append(f"{lead} doubles {'her' if he == 'She' else 'his'} {item}.")
            expr, clause = f"{value}*2", f"{he} doubles them"
        elif kind == "sub" and value > 2:
            b = rng.randint(1, min(value - 1, 15))
            new = value - b
            sentences.append(f"{lead} gives away {b} {item}.")
            expr, clause = f"{value}-{b}", f"{he} gives away {b}"
        else:
            b = rng.randint(1, 15)
            new = value + b
            sentences.append(f"{lead} gets {b} more {item}.")
            expr, clause = f"{value}+{b}", f"{he} gets {b} more"
        worked.append(f"{expr}=<<{expr}={new}>>{new}")
        steps.append((clause, expr, new))
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    style = style or random.Random(question)
    return {
        "question": question,
        "answer": "\n".join(worked) + f"\n#### {value}",
        "trace": _trace(steps, name, item, start, style),
        "gold": str(value),
    }


def make_problems(n: int, seed: int) -> list[dict]:
    rng, style = random.Random(seed), random.Random(f"style-{seed}")
    return [make_problem(rng, style) for _ in range(n)]
