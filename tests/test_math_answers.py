"""Beyond GSM8K: MATH/AIME-style local files (problem / answer in LaTeX) graded with math-verify."""

import json

import pytest

from tribunal.chunks import intermediate_answers
from tribunal.grading import grade, grade_with_answer, is_plain_number
from tribunal.problems.loading import load_problems

MATH_ROWS = [
    {"problem": "Simplify $\\frac{\\sqrt{8}}{4}$.", "answer": "\\frac{\\sqrt{2}}{2}"},
    {"problem": "Solve $1 < x \\le 2$ as an interval.", "answer": "(1, 2]"},
    {"problem": "Expand $(x+1)^2 - 2x$.", "answer": "x^2 + 1"},
    {"problem": "AIME: find the remainder when $2^{10}$ is divided by 1000.", "answer": "24"},
    {"problem": "What is $\\frac{3}{4}$ as a decimal?", "solution": "We divide: $3/4 = \\boxed{0.75}$."},
]

# (model output after an R1 prompt, row, label)
OUTPUTS = [
    ("sqrt 8 = 2 sqrt 2, over 4.\n</think>\n\\boxed{\\frac{\\sqrt2}{2}}", 0, "correct"),
    ("So it is 1/sqrt(2).\n</think>\n\\boxed{\\frac{1}{\\sqrt{2}}}", 0, "correct"),
    ("\n</think>\n\\boxed{\\frac{\\sqrt{2}}{4}}", 0, "incorrect"),
    ("\n</think>\n\\boxed{(1,2]}", 1, "correct"),
    ("\n</think>\n\\boxed{[1,2]}", 1, "incorrect"),
    ("\n</think>\n\\boxed{1 + x^2}", 2, "correct"),
    ("\n</think>\n\\boxed{x^2 + 2x + 1}", 2, "incorrect"),
    ("1024 mod 1000 = 24.\n</think>\nThe answer is \\boxed{024}.", 3, "correct"),
    ("\n</think>\n\\boxed{\\frac{3}{4}}", 4, "correct"),
    ("Still thinking about \\boxed{\\frac{\\sqrt2}{2}} maybe", 0, "unparsed"),  # no </think>: no answer
]


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS))
    return path


def test_math_style_file_loads_with_latex_golds(math_file):
    problems = load_problems(str(math_file))
    assert [p.gold for p in problems] == ["\\frac{\\sqrt{2}}{2}", "(1, 2]", "x^2 + 1", "24", "0.75"]
    assert problems[0].question.startswith("Simplify")
    assert not is_plain_number(problems[0].gold) and is_plain_number(problems[3].gold)


@pytest.mark.parametrize("text,row,label", OUTPUTS)
def test_latex_answers_are_graded_with_math_verify(math_file, text, row, label):
    gold = load_problems(str(math_file))[row].gold
    assert grade(text, gold, thinking=True) == label


def test_the_answer_is_kept_as_written_for_latex_golds(math_file):
    gold = load_problems(str(math_file))[1].gold
    assert grade_with_answer("\n</think>\n\\boxed{(1,2]}", gold, thinking=True) == ("correct", "(1,2]")


def test_intermediate_answers_use_the_same_comparison():
    text = "Maybe \\boxed{\\frac{1}{2}}.\n\nWait, rationalize: \\boxed{\\frac{\\sqrt{2}}{2}}.\n</think>\n\\boxed{\\frac{\\sqrt2}{2}}"
    chunks = intermediate_answers(text, "\\frac{\\sqrt{2}}{2}")
    assert [c.label for c in chunks] == ["incorrect", "correct", "correct"]
