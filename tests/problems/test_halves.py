"""question_halves: the short and long halves `run --validate` transfers between."""

from pathlib import Path

import pytest

from tribunal.errors import TribunalError
from tribunal.problems.halves import question_halves, sentences
from tribunal.problems.loading import Problem, load_problems
from tribunal.problems.synthetic import make_problems

GSM8K_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test.jsonl"


def test_the_embedded_problems_split_into_their_two_and_three_step_families():
    made = make_problems(80, seed=3)
    problems = [Problem(i, p["question"], p["gold"]) for i, p in enumerate(made)]
    (short_name, short, _), (long_name, long, description) = question_halves(problems)
    steps = {i: p["answer"].count("<<") for i, p in enumerate(made)}
    assert (short_name, long_name) == ("short", "long") and short | long == set(steps) and not short & long
    assert {steps[i] for i in short} == {2} and {steps[i] for i in long} == {3}
    assert description == f"questions of more than 4 sentences ({len(long)} problems)"


def test_gsm8k_splits_into_two_halves_of_similar_size():
    problems = load_problems(str(GSM8K_SAMPLE), "test")
    (_, short, _), (_, long, _) = question_halves(problems)
    assert abs(len(short) - len(long)) < len(problems) / 3
    assert max(sentences(p.question) for p in problems if p.problem_id in short) < \
        min(sentences(p.question) for p in problems if p.problem_id in long)


def test_questions_of_one_length_cannot_be_split():
    with pytest.raises(TribunalError, match="every question has 2 sentences"):
        question_halves([Problem(i, "A has 3. How many?", "3") for i in range(5)])
