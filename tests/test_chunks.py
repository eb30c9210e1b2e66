"""Reasoning chunks and intermediate answers on R1-style traces (thinking that changes its mind included), offline
and online (OnlineChunker: the same chunks while the text is generated, each as soon as it is final)."""

import random

import pytest

from tribunal.chunks import OnlineChunker, content_end, cue_pattern, intermediate_answers, split_chunks, token_ends

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


# --- Online chunking: the same chunks while the text is generated, each as soon as it is final --------------------

ONLINE_TEXTS = [  # (text, gold): splits the rules make only a few characters later, or never
    ("So 5.\n\nWait, 6.\n\nWaiting for the bus: 7.\n</think>\n\n\\boxed{7}", "7"),
    ("So 5. Wait", "5"),  # a cue at the very end: `\b` matches at the end of the text
    ("So 5. Wait, 6", "6"),
    ("So 5.\n\n", "5"),
    ("So 5.\n\nWaiting", "5"),  # not a cue
    ("So 5. Hmmm, 6. Hmm 7. hmm", "7"),
    ("3 + 4 = 7.</think>\\boxed{7}", "7"),  # the end of thinking with no whitespace after it
    ("3 + 4 = 7.\n</THINK>\n The answer is 7.", "7"),
    ("It is 8: hmm, 9? Hmmm. Hmm 10.\nLet me check: 10.\nLet me compute 11.\nCheck 12.\ncheck", "10"),
    ("On second thought it is 4. On second thoughts 5. Alternatively\n\n  \n 6", "6"),
    ("Double-check: 2.\tdouble check 3;  let me double-check 4!\n\tverify 5. Let me double", "5"),
    ("Total = 12.\n \nActually 13.\n\n\n", "13"),
    ("x = 1.\n</think>\n\n\\boxed{1}\n\nWait", "1"),
    ("é 5. Wait, 😀 6.\n\n中文 7. Hmm", "6"),
    ("</think>", "1"), ("", "1"), ("   ", "1"), ("\n\nWait, 3.", "3"), ("Wait", "1"),
]
PIECES = ["Wait", "wait", "Wa", "it", ",", " ", "  ", "\n", "\n\n", ".", ":", ";", "?", "!", "5", "42", " = ", "7", "x",
          "Waiting", "Hmm", "hmm", "m", "Let me check", "Let me ", "let me c", "heck", "double", "-check", " check",
          "So",
          "</think>", "</", "think", ">", "</THINK>", "\\boxed{", "}", " the answer is 9", "Alternatively", "Alt",
          "ernatively", "Actually", "verify", "To verify", "on second thought", "\t", " \n ", "é", "Check", " second"]
CONTINUATIONS = ("", " ", "\n", "\n\nWait, 7.", "ing 5.", "t, 3.", "</think>", "x", " check 4", "mm 3", "\\boxed{2}")


def online(pieces, gold, pattern=None):
    """(chunks, for each chunk the length of the text fed when it was reported, None for finish())."""
    chunker, out, seen = OnlineChunker(gold, pattern), [], 0
    for piece in pieces:
        seen += len(piece)
        out += [(c, seen) for c in chunker.feed(piece)]
    out += [(c, None) for c in chunker.finish()]
    return [c for c, _ in out], [at for _, at in out]


def splits(text, rng):
    """The text whole, one character at a time, and in random pieces of one to six characters."""
    cuts = [0]
    while cuts[-1] < len(text):
        cuts.append(min(len(text), cuts[-1] + rng.randint(1, 6)))
    return [[text], list(text), [text[a:b] for a, b in zip(cuts, cuts[1:])]]


def random_texts(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("text,gold", [(t, g) for t, g, _ in TRACES] + ONLINE_TEXTS)
def test_online_chunks_equal_offline(text, gold):
    expected = intermediate_answers(text, gold)
    for pieces in splits(text, random.Random(len(text))):
        assert online(pieces, gold)[0] == expected, pieces


def test_online_chunks_equal_offline_on_random_texts():
    """Cues, partial cues, whitespace runs and thinking markers in random order, fed in random pieces; every chunk
    reported before the end is in the offline chunks of the text so far followed by any continuation."""
    rng = random.Random(0)
    for text in random_texts(300, seed=1):
        expected = intermediate_answers(text, "42")
        for pieces in splits(text, rng):
            chunks, at = online(pieces, "42")
            assert chunks == expected, pieces
            for chunk, seen in zip(chunks, at):
                for more in CONTINUATIONS if seen is not None else ():
                    assert chunk in intermediate_answers(text[:seen] + more, "42"), (text[:seen], more, chunk)


@pytest.mark.parametrize("pieces,reported_on", [
    (["So 5.", "\n", "\n", "W", "ait, 6."], 3),  # the break is final once the whitespace ends
    (["So 5.", " ", "W", "a", "i", "t", ",", " 6."], 6),  # a cue once its word and the character after it are there
    (["So 5.", " Wai", "ting", " for 6.", " Then 7."], None),  # "Waiting" is no cue: one chunk, at the end
    (["x = 5.\n</th", "ink>", "\n\n", "\\boxed{5}"], 3),  # </think> split across tokens
    (["x = 5.</think>", "\\boxed{5}"], 1),
    (["So 5.", " Wait"], None),  # a cue at the very end: only the end of the text decides it
    (["So 5.", "\n\n", "Hmm", "m 6."], 2),  # "Hmmm" is no cue, and the paragraph break is final at "H"
    (["So 5.", " Let me c", "heck", ": 6."], 3),
    (["So 5.", " Let me c", "ompute", " 6."], None),
])
def test_online_cut_is_reported_as_soon_as_the_text_decides_it(pieces, reported_on):
    chunker = OnlineChunker("5")
    reported = [i for i, piece in enumerate(pieces) if chunker.feed(piece)]
    assert reported[:1] == ([] if reported_on is None else [reported_on])
    text = "".join(pieces)
    assert online(pieces, "5")[0] == intermediate_answers(text, "5")


def test_content_end_leaves_out_the_whitespace_before_the_next_chunk():
    text = "So 5.\n\nWait, 6. "
    first, second = intermediate_answers(text, "6")
    assert (content_end(text, first), content_end(text, second)) == (5, len(text) - 1)


def test_online_chunker_follows_custom_cues_and_refuses_a_regex_of_its_own():
    text = "A is 3. Next, B is 4. Finally C is 5. next"
    pattern = cue_pattern(cues=("next", "finally"))
    assert online(list(text), "5", pattern)[0] == intermediate_answers(text, "5", pattern)
    assert [c.answer for c in online(list(text), "5", pattern)[0]] == ["3", "4", "5"]
    with pytest.raises(ValueError, match="cue_pattern"):
        OnlineChunker("5", cue_pattern(extra=r"(?<=\.)\s+"))


@pytest.fixture(scope="module")
def embedded_traces():
    """The embedded model's tokenizer and (generated ids, gold) of 32 traces it samples at temperature 1, and of
    40 synthetic R1-shaped traces it is trained on (tokenized), each ending with the end-of-sequence token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tribunal.problems.loading import build_prompt, load_problems
    from tribunal.problems.synthetic import make_problems
    from tribunal.traces.models import EMBEDDED_MODEL

    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    problems = load_problems()[:32]
    prompts = [build_prompt(tok, p.question) for p in problems]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=model.config.max_position_embeddings - width,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    traces = []
    for row, problem in zip(out[:, width:].tolist(), problems):
        n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        traces.append((row[:n], problem.gold))
    for p in make_problems(40, seed=5):
        traces.append((tok(p["trace"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id], p["gold"]))
    return tok, traces


def test_online_chunks_and_their_tokens_equal_offline_on_embedded_traces(embedded_traces):
    """Token by token through IncrementalText (the engine's path), and character by character: the chunks of
    intermediate_answers, and the token of each content end that chunks.token_ends gives."""
    from tribunal.traces.detokenize import IncrementalText

    tok, traces = embedded_traces
    eos = {tok.eos_token_id}
    chunks_seen = 0
    for ids, gold in traces:
        text = tok.decode([i for i in ids if i not in eos], skip_special_tokens=False)
        expected = intermediate_answers(text, gold)
        pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
        tokens = token_ends(pieces, text, [content_end(text, c) for c in expected],
                            decode_prefix=lambda n, ids=ids: tok.decode(ids[:n], skip_special_tokens=False))
        incremental, chunker, got = IncrementalText(tok, eos), OnlineChunker(gold), []
        for token_id in ids:
            for chunk in chunker.feed(incremental.push(token_id)):
                got.append((chunk, incremental.token_of_char(content_end(incremental.text, chunk))))
        chunker.feed(incremental.finish())
        got += [(c, incremental.token_of_char(content_end(incremental.text, c))) for c in chunker.finish()]
        assert got == list(zip(expected, tokens)), text
        assert online(list(text), gold)[0] == expected
        chunks_seen += len(expected)
    assert len(traces) >= 30 + 40 and chunks_seen >= 2 * len(traces)
