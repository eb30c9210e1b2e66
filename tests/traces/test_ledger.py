"""The run's bookkeeping (tribunal.traces.ledger), with the embedded model's real tokenizer and problems: the pairs
left to sample after what the store holds, grading into labels with each label capped at its target, problems
finished once their last pair is graded in any order, and no side effects outside grade()."""

from collections import Counter

import numpy as np
import pytest

from tribunal.problems.loading import load_problems
from tribunal.traces.ledger import Prompts, RunLedger, SampledTrace, trace_seed
from tribunal.traces.models import load_model


@pytest.fixture(scope="module")
def prompts():
    _, tokenizer = load_model(None)
    return Prompts(tokenizer, None, None, {tokenizer.eos_token_id})


PROBLEMS = load_problems(None)[:4]


def held(labels=(), problems_done=(), done_keys=()):
    """What the store's writer reports on opening."""
    return {"labels": Counter(labels), "problems_done": set(problems_done), "done_keys": set(done_keys)}


def answering(prompts, problem, answer, finished=True) -> SampledTrace:
    """A trace of `problem` whose generated text ends with `answer` (the gold: correct; another number: incorrect)."""
    # the embedded model's prompt opens thinking: its answer follows </think>
    generated = prompts.tokenizer(f" so it is {answer}.</think> The answer is {answer}.",
                                  add_special_tokens=False)["input_ids"]
    generated += [prompts.tokenizer.eos_token_id] if finished else []
    n = len(prompts.ids(problem)) + len(generated)
    return SampledTrace(prompts.ids(problem), generated, np.zeros((1, n, 4), np.float16),
                        np.zeros(len(generated), np.float32), np.zeros(len(generated), np.float32), finished)


def test_pairs_are_what_the_store_does_not_hold(prompts):
    ledger = RunLedger(PROBLEMS, held({"correct": 3}, problems_done={0}, done_keys={(1, 0), (1, 2)}),
                       {"correct": 5, "incorrect": 5}, 3, False, prompts)
    expected = [(1, 1)] + [(p, s) for p in (2, 3) for s in range(3)]
    assert [(p.problem_id, s) for p, s in ledger.pairs] == expected
    assert ledger.counts == Counter({"correct": 3}) and not ledger.targets_met()
    # asking changes nothing: the pairs, counts and targets read the same twice
    assert [(p.problem_id, s) for p, s in ledger.pairs] == expected and ledger.counts == Counter({"correct": 3})


def test_grading_caps_each_label_at_its_target_and_finishes_problems_in_any_order(prompts):
    p0, p1 = PROBLEMS[:2]
    ledger = RunLedger([p0, p1], held({"correct": 1}), {"correct": 2, "incorrect": 1}, 2, False, prompts)
    wrong = int(p0.gold) + 1
    pairs = [(p0, 1), (p1, 0), (p0, 0)]
    sampled = [answering(prompts, p0, p0.gold), answering(prompts, p1, p1.gold), answering(prompts, p0, wrong)]
    records, finished = ledger.grade(pairs, sampled, [trace_seed(0, p.problem_id, s) for p, s in pairs])
    # correct: the store held 1 of 2, so one of the two correct traces is stored; incorrect: 0 of 1, stored
    assert [(r.problem_id, r.sample_index, r.label) for r in records] == [
        (p0.problem_id, 1, "correct"), (p0.problem_id, 0, "incorrect")]
    assert records[0].seed == trace_seed(0, p0.problem_id, 1) and records[0].finish_reason == "stop"
    assert records[0].text == " so it is 8.</think> The answer is 8." and records[0].predicted == "8"  # no stop token
    assert finished == [(p0.problem_id, 2)]  # p0's two pairs graded, p1 has one left
    assert ledger.counts == Counter({"correct": 2, "incorrect": 1}) and ledger.targets_met() and ledger.has_enough()
    assert ledger.graded == Counter({"correct": 2, "incorrect": 1})
    assert ledger.new_tokens == sum(len(t.generated_ids) for t in sampled)
    # past its target a label is still graded, and stored only with --keep-all
    more = [answering(prompts, p1, p1.gold, finished=False)]
    assert ledger.grade([(p1, 1)], more, [0]) == ([], [(p1.problem_id, 2)])
    assert ledger.graded["correct"] == 3 and ledger.counts["correct"] == 2
    keep = RunLedger([p1], held(), {"correct": 0, "incorrect": 0}, 1, True, prompts)
    records, _ = keep.grade([(p1, 0)], more, [0])
    assert [(r.label, r.finish_reason) for r in records] == [("correct", "length")] and not keep.has_enough()


def test_progress_shows_the_counts_while_open(prompts, tmp_path, capsys):
    ledger = RunLedger(PROBLEMS, held(problems_done={0}), {"correct": 1, "incorrect": 1}, 1, False, prompts)
    (tmp_path / "s.h5").write_bytes(b"x" * 2_000_000)
    with ledger.progress("generate 0/1", True, tmp_path / "s.h5"):
        ledger.grade([(PROBLEMS[1], 0)], [answering(prompts, PROBLEMS[1], PROBLEMS[1].gold)], [0])
        ledger.advance([(PROBLEMS[1].problem_id, 1)])
    shown = capsys.readouterr().err
    assert "generate 0/1" in shown and "2/4" in shown and "correct 1 incorrect 0 unparsed 0" in shown and "2.0 MB" in shown
