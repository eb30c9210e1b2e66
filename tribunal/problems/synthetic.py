"""Synthetic GSM8K-style multi-step word problems: the embedded model's training data and default dataset.

Each problem is a short story of 2-3 additions, subtractions and doublings, with a
GSM8K-format worked answer ending in `#### N`, and the R1-style trace the
embedded model is trained to produce (`<think>...</think> ... \\boxed{N}`).
Deterministic in the seed; no imports from the rest of tribunal.
"""

from __future__ import annotations

import random

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Amy", "Tom", "Eva", "Jay", "Liz", "Ray", "Kim", "Dan"]
ITEMS = ["apples", "marbles", "books", "coins", "stickers", "cookies", "pencils", "shells", "cards", "stamps"]
PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Ivy", "Amy", "Eva", "Liz", "Kim"} else "He") for n in NAMES}


def make_problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    he = PRONOUN[name]
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    worked = [f"{name} starts with {value} {item}."]
    steps = []
    for i in range(rng.randint(2, 3)):
        lead = "Then " + he.lower() if i else he
        kind = rng.choice(["add", "add", "sub", "sub", "double"])
        if kind == "double" and value <= 25:
            new = value * 2
            sentences.append(f"{lead} doubles {'her' if he == 'She' else 'his'} {item}.")
            expr = f"{value}*2"
        elif kind == "sub" and value > 2:
            b = rng.randint(1, min(value - 1, 15))
            new = value - b
            sentences.append(f"{lead} gives away {b} {item}.")
            expr = f"{value}-{b}"
        else:
            b = rng.randint(1, 15)
            new = value + b
            sentences.append(f"{lead} gets {b} more {item}.")
            expr = f"{value}+{b}"
        worked.append(f"{expr}=<<{expr}={new}>>{new}")
        steps.append(f"{expr}={new}.")
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {
        "question": question,
        "answer": "\n".join(worked) + f"\n#### {value}",
        "trace": "<think>" + " ".join(steps) + f"</think> The answer is \\boxed{{{value}}}.",
        "gold": str(value),
    }


def make_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]
