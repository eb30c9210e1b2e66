"""Reasoning chunks and intermediate answers on R1-style traces (thinking that changes its mind included)."""

import pytest

from tribunal.chunks import cue_pattern, intermediate_answers, split_chunks, token_ends

C, I = "correct", "incorrect"
# (generated text after an R1 prompt that opened thinking, gold, [(answer, label) of each answering chunk])
TRACES = [
    ("16 - 3 = 13.\n\n13 - 4 = 9. Wait, let me check: 16 - 3 - 4 = 9.\n\n9 * 2 = 18.\n</think>\n\n\\boxed{18}", "18",
     [("13", I), ("9", I), ("9", I), ("18", C), ("18", C)]),
    ("So the total is 42. Wait, I forgot the tax. 42 + 4 = 46.\n</think>\nThe answer is 46.", "46",
     [("42", I), ("46", C), ("46", C)]),
    ("5 + 7 = 12.\nHmm, maybe 13? No.\nActually it is 12.\n</think>\n\\boxed{12}", "12",
     [("12", C), ("13", I), ("12", C), ("12", C)]),
    ("Let x be the price. Then 3x = 27, so x = 9.\n\nAlternatively, 27 / 3 = 9.\n</think>\n\n**Final Answer**\n\\boxed{9}",
     "9", [("9", C), ("9", C), ("9", C)]),
    ("She has 20 apples and gives away half: 10.\n\nThen she buys 5 more: 15. Wait, she gave away half of 20, so 10 left, "
     "plus 5 is 15.\n</think>\n\\boxed{15}", "15", [("10", I), ("15", C), ("15", C), ("15", C)]),
    ("The train goes 60 km/h for 2 hours: 120 km.\n\nHold on, it was 3 hours: 180 km.\n</think>\nSo \\boxed{180} km.",
     "180", [("120", I), ("180", C), ("180", C)]),
    ("Okay, let me think.\n\nFirst, I need the total cost.\n\nEach book is $4 and she buys 6: 4 * 6 = 24.\n</think>\n"
     "\\boxed{24}", "24", [("24", C), ("24", C)]),  # no-answer chunks merge into the next
    ("12 / 4 = 3 boxes.\n\nBut wait, each box holds 5, so 3 * 5 = 15.\n</think>\n\\boxed{15}", "15",
     [("3", I), ("15", C), ("15", C)]),
    ("The answer is 7.\n\nLet me verify: 3 + 4 = 7. Yes.\n</think>\n\\boxed{7}", "7", [("7", C), ("7", C), ("7", C)]),
    ("Speed is 10 m/s, time 6 s, distance 60 m.\n\nDouble-check: 10 * 6 = 60.\n</think>\nThe distance is 60 m.", "60",
     [("60", C), ("60", C), ("60", C)]),
    ("He earns $15 an hour for 8 hours: $120.\n\nOn second thought, he worked 7 hours: $105.\n</think>\n\\boxed{105}",
     "105", [("120", I), ("105", C), ("105", C)]),
    ("20% of 50 is 10.\n\nSo the discount is 10 and the price is 40.\n</think>\n\\boxed{40}", "40",
     [("10", I), ("40", C), ("40", C)]),
    ("1/2 of 8 is 4.\n\nThen 4 + 1/4 of 8 = 4 + 2 = 6.\n</think>\n\\boxed{6}", "6", [("4", I), ("6", C), ("6", C)]),
    ("So the answer is 30.\n\nHmm, wait. 5 * 7 = 35, not 30.\n</think>\n\\boxed{35}", "35",
     [("30", I), ("30", I), ("35", C)]),
    ("Total = 3 + 5 + 9 = 17.\n</think>\n\\boxed{17}", "17", [("17", C), ("17", C)]),
    ("I think it's 64.\n\nWait, 8 squared is 64 and the question asks for 8 cubed: 512.\n</think>\n\\boxed{512}", "512",
     [("64", I), ("512", C), ("512", C)]),
    ("First: 100 - 35 = 65.\nThen: 65 - 20 = 45.\nCheck: 35 + 20 + 45 = 100.\n</think>\n\\boxed{45}", "45",
     [("45", C), ("100", I), ("45", C)]),  # one chunk by lines; "Check" opens a new one
    ("Mia has 12 marbles. She doubles them: 24.\n\nLet me recheck: 12 * 2 = 24.\n</think>\nMia has 24 marbles.", "24",
     [("24", C), ("24", C), ("24", C)]),
    ("There are 7 days in a week, 4 weeks: 28 days.\n\nAlternatively, February has 28 days.\n</think>\n\\boxed{28}",
     "28", [("28", C), ("28", C), ("28", C)]),
    ("Cost: 3 * $2.50 = $7.50.\n</think>\nThe answer is $7.50.", "7.5", [("7.5", C), ("7.5", C)]),
    ("It's negative: 5 - 12 = -7.\n</think>\n\\boxed{-7}", "-7", [("-7", C), ("-7", C)]),
    ("The ratio is 3/4.\n\nWait, it asks for a percentage: 75%.\n</think>\n\\boxed{75}", "75",
     [("0.75", I), ("75", C), ("75", C)]),
    ("He has 2 1/2 pies.\n</think>\n\\boxed{2\\frac{1}{2}}", "2.5", [("2.5", C), ("2.5", C)]),
    ("Hmm.\n\nHmm, let me think.\n\nOK: 9 + 10 = 19.\n</think>\n\\boxed{19}", "19", [("19", C), ("19", C)]),
    ("So 48 cookies.\n\nWait, she ate 6: 42.\n\nWait, and gave 2 away: 40.\n</think>\n\\boxed{40}", "40",
     [("48", I), ("42", I), ("40", C), ("40", C)]),
    ("The area is 5 * 4 = 20.\n\nVerify: 4 * 5 = 20.\n</think>\n\\boxed{20}", "20", [("20", C), ("20", C), ("20", C)]),
    ("Let me compute 1,200 + 800 = 2,000.\n</think>\n\\boxed{2,000}", "2000", [("2000", C), ("2000", C)]),
    ("He runs 3 miles a day, 7 days: 21.\n\nActually, he rests on Sunday: 18.\n</think>\n\\boxed{18}", "18",
     [("21", I), ("18", C), ("18", C)]),
    ("It takes 45 minutes.\n</think>\nIt takes \\boxed{45} minutes.", "45", [("45", C), ("45", C)]),
    ("Half of 30 is 15, half again is 7.5.\n\nBut you cannot have half a person, so 7.\n</think>\n\\boxed{7}", "8",
     [("7.5", I), ("7", I), ("7", I)]),
    ("6 * 7 = 42.\n\nWait, the question wants 6 * 8 = 48.\n\nNo wait, it was 7: 42.\n</think>\n\\boxed{42}", "42",
     [("42", C), ("48", I), ("42", C), ("42", C)]),
    ("Unfinished: 3 + 4 = 7, then times 6 gives", "42", [("6", I)]),  # cut mid-thought: one chunk, its last number
]


@pytest.mark.parametrize("text,gold,expected", TRACES)
def test_intermediate_answers(text, gold, expected):
    chunks = intermediate_answers(text, gold)
    assert [(c.answer, c.label) for c in chunks] == expected, [text[c.start:c.end] for c in chunks]
    assert all(c.start < c.end for c in chunks) and chunks[-1].end <= len(text)


def test_intermediate_answers_compare_latex_as_the_final_grade_does():
    text = "Maybe \\boxed{\\frac{1}{2}}.\n\nWait, rationalize: \\boxed{\\frac{\\sqrt{2}}{2}}.\n</think>\n\\boxed{\\frac{\\sqrt2}{2}}"
    chunks = intermediate_answers(text, "\\frac{\\sqrt{2}}{2}")
    assert [c.label for c in chunks] == ["incorrect", "correct", "correct"]


def test_chunks_cover_the_text_and_start_at_cues():
    text = "So 5.\n\nWait, 6. Alternatively 7? hmm no. I wait for the bus: 8."
    spans = [text[c.start:c.end] for c in split_chunks(text)]
    assert "".join(spans) == text
    assert spans == ["So 5.\n\n", "Wait, 6. ", "Alternatively 7? ", "hmm no. I wait for the bus: 8."]


def test_custom_cues_and_regex():
    text = "A is 3. Next, B is 4. Finally C is 5."
    pattern = cue_pattern(cues=("next", "finally"))
    assert [c.answer for c in intermediate_answers(text, "5", pattern)] == ["3", "4", "5"]
    pattern = cue_pattern(cues=(), extra=r"(?<=\.)\s+")
    assert len(split_chunks(text, pattern)) == 3


def test_token_ends_map_the_last_character_to_its_token():
    pieces = ["So", " 5", ".", "\n\n", "Wait", ",", " 6", ".", "</s>"]
    text = "So 5.\n\nWait, 6."
    assert token_ends(pieces, text, [5, len(text)]) == [2, 7]
    # a byte-level tokenizer whose pieces do not spell the text: prefix decodes decide
    broken = ["S", "o 5", "\ufffd", "\ufffd", "."]
    real = "So 5é."
    prefixes = ["", "S", "So 5", "So 5", "So 5é", "So 5é."]
    assert token_ends(broken, real, [4, 5, 6], decode_prefix=lambda n: prefixes[n]) == [1, 3, 4]
