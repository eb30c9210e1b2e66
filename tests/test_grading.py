"""Grading (tribunal.grading): the answer parser pinned down by realistic model outputs (plain, GSM8K-style and
R1-style thinking), golds, and the comparison, LaTeX answers (MATH/AIME) through math-verify included."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import GSM8K, R1_TEMPLATE
from tribunal.grading import (answers_match, extract_answer, grade, grade_with_answer, is_plain_number, parse_gold,
                              prompt_opens_thinking)
from tribunal.problems.loading import build_prompt
from tribunal.traces.models import EMBEDDED_MODEL

# (model output, expected extract_answer)
TABLE = [
    # R1-style: thinking, then the answer after </think>
    ("<think>Janet has 16 eggs. 16 - 3 - 4 = 9. 9 * 2 = 18.</think>\nShe makes \\boxed{18} dollars.", "18"),
    ("<think>First 5+7=12, maybe 13? No, 12.</think>The answer is \\boxed{12}.", "12"),
    ("<think>Let me compute 3*4=12 and then 12+1=13.\nWait, the answer is 14? no.</think>\n\n**Final Answer**\n\\boxed{13}", "13"),
    ("<think>So \\boxed{7} maybe. Let me recheck: 8.</think>\nFinal answer: \\boxed{8}", "8"),
    ("<think>The total is 120.</think>\nThe total cost is $120.", "120"),
    ("<think>Compute 45/9 = 5.</think>\nTherefore, the answer is 5 hours.", "5"),
    ("<think>\nOkay, so 20% of 50 is 10.\n</think>\n\nThe discount is \\boxed{10}.", "10"),
    ("<think>hmm 1, 2, 3 ... the count is 42</think>", None),  # thought, then said nothing: no answer
    ("<think>Okay let's see. 12 apples minus 5 is 7, and then", None),  # cut while thinking
    ("<think>The first step gives 30. Then the answer is 45.", None),  # still thinking: not an answer yet
    ("<think>So \\boxed{7} it is.</think>\nI am not sure.", None),  # a boxed guess while thinking does not count
    ("<think>a</think><think>b</think> \\boxed{3}", "3"),
    # \boxed with nesting and LaTeX
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("So we get \\boxed{\\dfrac{3}{4}}", "0.75"),
    ("Thus \\boxed{\\text{42 apples}}.", "42"),
    ("\\boxed{1,234}", "1234"),
    ("\\boxed{\\$1,234.50}", "1234.5"),
    ("\\boxed{-5}", "-5"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{18.00}", "18"),
    ("\\boxed{7.0}", "7"),
    ("\\boxed{{12}}", "12"),
    ("\\boxed{3\\,000}", "3000"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{\\frac{10}{4}}", "2.5"),
    ("First \\boxed{4}, then corrected: \\boxed{5}", "5"),
    ("\\boxed{ 64 }", "64"),
    ("\\boxed{\\left(12\\right)}", "12"),
    ("\\fbox{77}", "77"),
    ("\\boxed{}  The answer is 8.", "8"),
    # GSM8K style
    ("She sells 9 eggs for $2 each: 9*2=<<9*2=18>>18\n#### 18", "18"),
    ("Total = 1,500 + 500 = 2,000\n#### 2,000", "2000"),
    ("#### -12", "-12"),
    ("#### 0.25", "0.25"),
    ("#### $45", "45"),
    ("#### 3 \n", "3"),
    ("Work: 2+2=4\n#### 4\nExtra text 99", "4"),
    # "the answer is"
    ("So the answer is 72.", "72"),
    ("The final answer is: 1,080 dollars.", "1080"),
    ("Answer: 15 minutes", "15"),
    ("Therefore the answer is $3.50.", "3.5"),
    ("The answer would be -7 degrees.", "-7"),
    ("The answer is 1/4 of the pie.", "0.25"),
    ("the answer is 60%.", "60"),
    ("The answer is 10. Actually no, the answer is 12.", "12"),
    ("Final answer: 2.50", "2.5"),
    ("The answer is:\n\n48", "48"),
    ("answer = 36", "36"),
    # last-number fallback
    ("He has 5 apples and buys 3 more, so he has 8 apples.", "8"),
    ("After 2 weeks she saved $340.", "340"),
    ("It costs 1,250 dollars in total.", "1250"),
    ("The temperature drops to -4.", "-4"),
    ("In total they need 2.75 liters.", "2.75"),
    ("The ratio is 3/5.", "0.6"),
    ("3 + 4 = 7", "7"),
    ("The items are 3, 4 and 5.", "5"),
    # nothing to parse
    ("I am not sure how to solve this.", None),
    ("", None),
    ("Let me think about the eggs and the ducks", None),
    ("<think>", None),
    ("\\boxed{}", None),
    # units, currency, mixed
    ("\\boxed{\\text{\\$}18}", "18"),
    ("The answer is €25.", "25"),
    ("\\boxed{12 \\text{ hours}}", "12"),
    ("The answer is 1\u2009000 meters", "1"),
    ("\\boxed{5\\text{ km}}", "5"),
    ("\\boxed{0.5 \\text{ kg}}", "0.5"),
    ("\\boxed{\u221212}", "-12"),
    # a careful grader: the sign survives a currency symbol, mixed numbers, powers of ten, times
    ("The answer is -$5.", "-5"),
    ("\\boxed{-\\$5}", "-5"),
    ("\\boxed{-\\$1,250.50}", "-1250.5"),
    ("\\boxed{2\\frac{1}{2}}", "2.5"),
    ("\\boxed{2 \\frac{3}{4}}", "2.75"),
    ("2 1/2", "2.5"),
    ("The answer is 3 1/4 cups.", "3.25"),
    ("\\boxed{-1\\frac{1}{2}}", "-1.5"),
    ("\\boxed{1.5 \\times 10^3}", "1500"),
    ("\\boxed{2 \\times 10^{-2}}", "0.02"),
    ("1.5e3", "1500"),
    ("The answer is 2.5E2.", "250"),
    ("\\boxed{3:30}", "3:30"),
    ("The answer is 10:45", "10:45"),
    ("Step 2: 42", "42"),  # a colon and a space: a label, not a time
]


@pytest.mark.parametrize("text,expected", TABLE)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,gold", [
    ("The answer is -$5.", "-5"), ("\\boxed{-\\$5}", "-5"), ("\\boxed{2\\frac{1}{2}}", "2.5"), ("2 1/2", "2.5"),
    ("\\boxed{1.5 \\times 10^3}", "1500"), ("1.5e3", "1500"),
])
def test_careful_grader_accepts(text, gold):
    assert grade(text, gold) == "correct"


@pytest.mark.parametrize("gold", ["3", "30", "3.5", "330", "210"])
def test_a_time_is_never_a_number(gold):
    assert grade("\\boxed{3:30}", gold) != "correct"
    assert grade("It takes until 3:30.", gold) != "correct"


@pytest.mark.parametrize(
    "text,gold,label",
    [
        ("\\boxed{18}", "18", "correct"),
        ("\\boxed{18.0}", "18", "correct"),
        ("\\boxed{1,234}", "1234", "correct"),
        ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
        ("\\boxed{17}", "18", "incorrect"),
        ("no answer here", "18", "unparsed"),
        ("<think>12 then 13 then", "13", "unparsed"),
        ("The answer is 50%", "50", "correct"),
        ("#### 7", "7.00", "correct"),
    ],
)
def test_grade(text, gold, label):
    assert grade(text, gold) == label


def test_cut_at_token_limit_is_unparsed():
    text = "First 12 apples, then 5 more, so 17 and"
    assert grade(text, "17", finished=True) == "correct"  # a finished trace may answer in prose
    assert grade(text, "17", finished=False) == "unparsed"  # a cut one has no answer
    assert grade(text + " so \\boxed{17}", "17", finished=False) == "correct"


def test_gold_from_real_gsm8k():
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:200]]
    golds = [parse_gold(r["answer"]) for r in rows]
    assert golds[0] == "18" and all(g for g in golds)
    assert parse_gold("... \n#### 1,000") == "1000"
    assert answers_match("1000.0", parse_gold("#### 1,000"))
    with pytest.raises(ValueError, match="empty answer"):
        parse_gold("  ")
    assert parse_gold("\\text{Monday}") == "\\text{Monday}"  # a MATH-style text answer is kept as written


# -- reasoning models: thinking opened by the prompt -------------------------------------------------------

# A template that closes thinking itself (some "no-think" variants) and a plain one without any.
CLOSED_TEMPLATE = R1_TEMPLATE.replace("<think>\\n' }}", "<think>\\n\\n</think>\\n\\n' }}")
PLAIN_TEMPLATE = R1_TEMPLATE.replace("<think>\\n' }}", "' }}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


def rendered(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer.decode(build_prompt(tokenizer, "Janet has 16 eggs...", use_chat_template=True),
                            skip_special_tokens=False)


def test_thinking_is_read_from_the_rendered_prompt(tokenizer):
    prompt = rendered(tokenizer, R1_TEMPLATE)
    assert prompt.rstrip().endswith("<think>") and prompt_opens_thinking(prompt)
    assert not prompt_opens_thinking(rendered(tokenizer, CLOSED_TEMPLATE))
    assert not prompt_opens_thinking(rendered(tokenizer, PLAIN_TEMPLATE))
    assert not prompt_opens_thinking("Question: 2+2?\nAnswer:")


# (generated text after an R1 prompt, finished, gold, label)
R1_OUTPUTS = [
    ("Okay, 16 - 3 - 4 = 9 eggs, maybe \\boxed{7}? Wait, times 6 gives", False, "42", "unparsed"),
    ("Okay, 16 - 3 - 4 = 9, and 9 * 2 = 18. So the answer is 18.", False, "18", "unparsed"),  # cut mid-thought
    ("So the answer is 18.", True, "18", "unparsed"),  # stopped without closing its thinking: no answer
    ("9 * 2 = 18, maybe \\boxed{17}.\n</think>\n\nShe makes \\boxed{18} dollars.", True, "18", "correct"),
    ("So 18? No wait, 9*2=18.\n</think>\n\n**Final Answer**\n\\boxed{20}", True, "18", "incorrect"),
    ("It is 42.\n</think>\n\nThe total is 42 dollars.", True, "42", "correct"),
    ("It is 42.\n</think>\n\nThe total is 42 dol", False, "42", "unparsed"),  # answer cut off: no last-number guess
    ("It is 42.\n</think>\n\nThe answer is \\boxed{42}", False, "42", "correct"),  # boxed before the cut
    ("The count is 42\n</think>\n", True, "42", "unparsed"),  # thought, then said nothing
]


@pytest.mark.parametrize("text,finished,gold,label", R1_OUTPUTS)
def test_r1_outputs(text, finished, gold, label):
    assert grade(text, gold, finished=finished, thinking=True) == label


def test_unfinished_thinking_is_not_an_answer():
    assert grade("<think>\u2026 maybe \\boxed{7}? Wait, times 6 gives", "42") == "unparsed"
    assert grade("<think>\u2026 maybe \\boxed{42}? Wait, times 6 gives", "42") == "unparsed"


def test_no_thinking_markers_keep_the_plain_rules():
    assert extract_answer("He has 5 apples and buys 3 more, so he has 8 apples.") == "8"
    assert extract_answer("He has 5 apples and buys 3 more, so he has 8 apples.", thinking=True) is None


# -- LaTeX golds (MATH/AIME-style files): compared with math-verify -------------------------------------------

MATH_GOLDS = ["\\frac{\\sqrt{2}}{2}", "(1, 2]", "x^2 + 1", "24", "0.75"]
# (model output after an R1 prompt, index of its gold in MATH_GOLDS, label)
LATEX_OUTPUTS = [
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


@pytest.mark.parametrize("text,row,label", LATEX_OUTPUTS)
def test_latex_answers_are_graded_with_math_verify(text, row, label):
    assert grade(text, MATH_GOLDS[row], thinking=True) == label


def test_the_answer_is_kept_as_written_for_latex_golds():
    assert not is_plain_number(MATH_GOLDS[0]) and is_plain_number(MATH_GOLDS[3])
    assert grade_with_answer("\n</think>\n\\boxed{(1,2]}", MATH_GOLDS[1], thinking=True) == ("correct", "(1,2]")


# -- the generator grades with its prompt's thinking -----------------------------------------------------------
