"""The synthetic problems (tribunal/problems/synthetic.py): GSM8K-format answers and R1-shaped traces that tribunal's
own grading and chunking read as the embedded model is meant to write them."""

import random
import statistics

from tribunal.chunks import intermediate_answers
from tribunal.grading import ANSWER_CUE, THINK_OPEN, grade, parse_gold
from tribunal.problems.synthetic import RECIPE, make_problem, make_problems


def test_deterministic_in_the_seed_with_questions_apart_from_the_trace_style():
    assert make_problems(30, seed=4) == make_problems(30, seed=4)
    assert make_problems(30, seed=4) != make_problems(30, seed=5)
    alone = make_problem(random.Random(4), style=random.Random("another style"))
    assert alone["question"] == make_problems(1, seed=4)[0]["question"]
    assert alone["answer"] == make_problems(1, seed=4)[0]["answer"]


def test_gsm8k_answers_and_traces_that_follow_a_prompt_opening_thinking():
    for p in make_problems(300, seed=11):
        assert p["answer"].endswith(f"\n#### {p['gold']}") and parse_gold(p["answer"]) == p["gold"]
        assert THINK_OPEN not in p["trace"] and p["trace"].endswith(ANSWER_CUE + p["gold"] + "}.")
        assert grade(p["trace"], p["gold"], thinking=True) == "correct"
        assert p["trace"].count("\n</think>") == 1 and not p["trace"].startswith("\n")


def test_chunks_state_right_and_wrong_intermediate_answers_slips_are_caught_and_rechecks_are_right():
    problems = make_problems(2000, seed=12)
    slips = rechecks = 0
    for p in problems:
        text, chunks = p["trace"], intermediate_answers(p["trace"], p["gold"])
        steps = p["answer"].count("<<")
        assert len(chunks) >= 2 + steps and chunks[-1].label == chunks[-2].label == "correct"
        assert any(c.label == "incorrect" for c in chunks[:-2]) or p["gold"] in text.split("\n\n")[0]
        starts = [text[c.start :] for c in chunks]
        for before, after, start in zip(chunks, chunks[1:], starts[1:]):
            if start.startswith("Wait, "):  # the slip's chunk states the wrong result the reflection names
                slips += 1
                assert f"not {before.answer}." in text[after.start : after.end] and before.answer != after.answer
            if start.startswith("Let me check: "):  # a re-check of a final result that was already right
                rechecks += 1
                assert before.label == after.label == "correct"
    assert abs(slips / len(problems) - RECIPE["slip"]) < 0.03
    assert abs(rechecks / len(problems) - RECIPE["recheck"]) < 0.03
    words = [len(p["trace"].split()) for p in problems]
    assert statistics.mean(words) < 50 and max(words) < 90  # short: the tests sample from the model trained on them
