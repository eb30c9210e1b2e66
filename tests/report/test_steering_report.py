"""The steering report on hand-built arm stores whose every effect is planted, and its statistics by simulation:
the problem bootstrap's coverage and how often the 'specific' verdict is given when the direction is no
different from the random ones."""

import csv
import json

import numpy as np
import pytest

from tribunal.errors import TribunalError
from tribunal.report.steering_report import cue_count, paired_bootstrap, specificity, steering_report
from tribunal.store import StoreWriter, TraceRecord

PROMPT = [1, 2]
D = 8
PROBLEMS, SAMPLES = range(4), range(2)
BASE_TEXT = "We check x.\n\nSo x is {}."  # a paragraph break and a mid-sentence "check": no reflection cue
CUE = " Wait, yes."  # one cue


def record(key, correct, predicted, tokens, text):
    acts = np.zeros((1, len(PROMPT) + tokens, D), np.float32)
    return TraceRecord(problem_id=key[0], sample_index=key[1], token_ids=np.array(PROMPT + [5] * tokens),
                       prompt_length=len(PROMPT), activations=acts, label="correct" if correct else "incorrect",
                       text=text, predicted=predicted, gold="1")


def baseline_trace(p, s):
    """(correct, predicted, generated tokens, text): sample 1 of every problem right, sample 0 wrong."""
    answer = "1" if s == 1 else "9"
    return s == 1, answer, 4 + p, BASE_TEXT.format(answer)


def directed_trace(p, s):
    """The planted effect: sample 0 flips to the right answer, every trace 3 tokens and one cue longer."""
    _, answer, tokens, text = baseline_trace(p, s)
    return True, "1", tokens + 3, BASE_TEXT.format("1") + CUE


def ablated_trace(p, s):
    """Sample 1 of problems 0 and 1 turns wrong (answer 7); every trace one token shorter."""
    correct, answer, tokens, text = baseline_trace(p, s)
    if s == 1 and p < 2:
        correct, answer = False, "7"
    return correct, answer, tokens - 1, text


def mixed_tokens_trace(p, s):
    """6 tokens more in problems 0 and 1, 2 fewer in 2 and 3: +2 on average, a CI that covers 0."""
    correct, answer, tokens, text = baseline_trace(p, s)
    return correct, answer, tokens + (6 if p < 2 else -2), text


def write(path, trace, keys=None):
    keys = keys or [(p, s) for p in PROBLEMS for s in SAMPLES]
    with StoreWriter(path, model_id="test/model", layers=(1,), d_model=D, chunk_tokens=32) as w:
        w.append([record(k, *trace(*k)) for k in keys])
    return path


def arm(tmp_path, name, kind, alpha, trace, random_index=None, keys=None):
    return {"name": name, "kind": kind, "alpha": alpha, "random_index": random_index,
            "store": write(tmp_path / f"{name}.h5", trace, keys)}


@pytest.fixture
def planted(tmp_path):
    """The direction at +4 does all the planted work, the random directions at +4 nothing; -4 has no controls.
    The direction's store holds the pairs in another order: arms are paired by key, not by row."""
    keys = [(p, s) for p in PROBLEMS for s in SAMPLES]
    return [arm(tmp_path, "baseline", "baseline", 0.0, baseline_trace),
            arm(tmp_path, "direction_a+4", "direction", 4.0, directed_trace, keys=keys[::-1]),
            arm(tmp_path, "direction_a-4", "direction", -4.0, baseline_trace),
            arm(tmp_path, "random0_a+4", "random", 4.0, baseline_trace, 0),
            arm(tmp_path, "random1_a+4", "random", 4.0, baseline_trace, 1),
            arm(tmp_path, "ablation", "ablation", None, ablated_trace)]


def exact(value):
    return {"value": pytest.approx(value), "ci": [pytest.approx(value), pytest.approx(value)]}


def cell(result, alpha, outcome):
    (s,) = [s for s in result["specificity"] if s["alpha"] == alpha and s["outcome"] == outcome]
    return s


def test_reflection_cues_are_cues_opening_a_sentence_or_line():
    text = "Wait, no. But wait, hmm. Let me check: x.\n\nActually 3. We check it; hmm\nHmm. Waiting."
    # Wait (the start), But wait, Let me check, Actually (after a paragraph break), hmm (after ;), Hmm (a line)
    assert cue_count(text) == 6
    assert cue_count("So x is 2.\n\nThus 2. We verify it.") == 0  # paragraph breaks and mid-sentence cues: none
    assert cue_count(BASE_TEXT.format(1)) == 0 and cue_count(BASE_TEXT.format(1) + CUE) == 1


def test_planted_effects_are_recovered_exactly_and_called_specific(planted, tmp_path):
    result = steering_report(planted, tmp_path / "out", bootstrap=500)
    arms = {a["name"]: a for a in result["arms"]}
    base = arms["baseline"]
    assert (base["traces"], base["accuracy"], base["mean_tokens"], base["cues_per_trace"]) == (8, 0.5, 5.5, 0.0)
    assert base["effects"] is None and base["answer_changed"] == 0.0
    d = arms["direction_a+4"]
    assert (d["accuracy"], d["mean_tokens"], d["cues_per_trace"], d["answer_changed"]) == (1.0, 8.5, 1.0, 0.5)
    # every problem holds the same change, so every bootstrap draw gives it: CIs of zero width
    assert d["effects"] == {"accuracy": exact(0.5), "mean_tokens": exact(3.0), "cues_per_trace": exact(1.0),
                            "answer_changed": exact(0.5)}
    assert arms["random0_a+4"]["effects"]["accuracy"] == exact(0.0)
    ablation = arms["ablation"]["effects"]
    assert ablation["accuracy"]["value"] == pytest.approx(-0.25) and ablation["mean_tokens"] == exact(-1.0)
    assert ablation["answer_changed"]["value"] == pytest.approx(0.25) and ablation["cues_per_trace"] == exact(0.0)
    for outcome in ("accuracy", "mean_tokens", "cues_per_trace", "answer_changed"):
        s = cell(result, 4.0, outcome)
        assert s["verdict"] == "specific", (outcome, s["reasons"])
        assert (s["random"], s["random_arms"], s["rank_p"]) == ([0.0, 0.0], ["random0_a+4", "random1_a+4"], 1 / 3)
        assert s["contrast"] == exact(d["effects"][outcome]["value"])
        assert cell(result, -4.0, outcome)["verdict"] == "no controls"
    assert result["headline_alpha"] == 4.0  # the smallest positive alpha
    lines = result["sentences"]
    assert ("steering along the direction at alpha = 4 changes accuracy by +50.0 percentage points [+50.0, +50.0] "
            "(problem-bootstrap 95% CI); the 2 random directions change it by +0.0 to +0.0 percentage points; the "
            "effect is specific to the direction (its CI excludes 0, it lies outside the random directions' range, "
            "and its contrast with their mean has a CI excluding 0)") in lines
    assert any(x.startswith("steering along the direction at alpha = 4 changes the generated tokens by "
                            "+3.0 tokens per trace [+3.0, +3.0]") for x in lines)
    assert any(x.startswith("steering along the direction at alpha = 4 changes the reflection cues by +1.00 "
                            "cues per trace [+1.00, +1.00]") for x in lines)
    assert any(x.startswith("steering along the direction at alpha = 4 changes the final answer of 50.0% of traces "
                            "[50.0%, 50.0%]") and "change it for 0.0% to 0.0% of traces" in x for x in lines)
    assert any(x.startswith("ablating the direction") and "accuracy by -25.0 percentage points" in x
               and "the final answer of 25.0% of traces" in x for x in lines)
    assert result["summary"] == "\n".join(lines)
    other = steering_report(planted, tmp_path / "out2", bootstrap=500, headline_alpha=-4)
    assert any("at alpha = -4 changes accuracy by +0.0" in x and "untested" in x for x in other["sentences"])


def test_random_directions_that_change_as_much_make_it_not_specific(tmp_path):
    arms = [arm(tmp_path, "baseline", "baseline", 0.0, baseline_trace),
            arm(tmp_path, "direction_a+4", "direction", 4.0, directed_trace),
            arm(tmp_path, "random0_a+4", "random", 4.0, directed_trace, 0),  # the direction's own change
            arm(tmp_path, "random1_a+4", "random", 4.0, baseline_trace, 1),
            arm(tmp_path, "direction_a+8", "direction", 8.0, mixed_tokens_trace),
            arm(tmp_path, "random0_a+8", "random", 8.0, baseline_trace, 0)]
    result = steering_report(arms, tmp_path / "out", bootstrap=2000)
    s = cell(result, 4.0, "accuracy")
    assert s["direction"] == exact(0.5) and (s["random_min"], s["random_max"]) == (0.0, 0.5)
    assert s["contrast"] == exact(0.25) and s["rank_p"] == 2 / 3  # the contrast alone would pass
    assert (s["verdict"], s["reasons"]) == ("not specific", ["it lies inside the random directions' range"])
    assert any(x.startswith("steering along the direction at alpha = 4 changes accuracy by +50.0 percentage points")
               and x.endswith("change it by +0.0 to +50.0 percentage points; the effect is not specific to the "
                              "direction (it lies inside the random directions' range)") for x in result["sentences"])
    # +6 tokens in two problems, -2 in the other two: a bootstrap draw of only the latter (1 in 16) gives -2
    s = cell(result, 8.0, "mean_tokens")
    assert s["direction"]["value"] == pytest.approx(2.0) and s["direction"]["ci"] == [-2.0, 6.0]
    assert s["verdict"] == "not specific"
    assert s["reasons"] == ["its CI covers 0", "its contrast with the random directions' mean has a CI covering 0"]


def test_arms_of_other_pairs_are_refused_and_nothing_is_written(tmp_path):
    keys = [(p, s) for p in PROBLEMS for s in SAMPLES]
    arms = [arm(tmp_path, "baseline", "baseline", 0.0, baseline_trace),
            arm(tmp_path, "direction_a+4", "direction", 4.0, directed_trace),
            arm(tmp_path, "random0_a+4", "random", 4.0, baseline_trace, 0, keys=keys[:-1] + [(9, 0)])]
    out = tmp_path / "out"
    with pytest.raises(TribunalError, match=r"arm 'random0_a\+4' .* differ in 2 \(problem, sample\) keys \(1 only "
                                            r"in the baseline, 1 only in the arm"):
        steering_report(arms, out, bootstrap=200)
    assert not out.exists()
    with pytest.raises(TribunalError, match="2 baseline arms"):
        steering_report(arms[:2] + [{**arms[0], "name": "baseline2"}], out, bootstrap=200)
    with pytest.raises(TribunalError, match="no direction arm at the headline alpha 2"):
        steering_report(arms[:2], out, bootstrap=200, headline_alpha=2.0)
    assert not out.exists()


def test_the_files_hold_the_sentences_one_csv_row_per_arm_and_the_figure(planted, tmp_path):
    out = tmp_path / "out"
    result = steering_report(planted, out, bootstrap=300)
    assert result["files"] == {"json": str(out / "steering.json"), "csv": str(out / "steering.csv"),
                               "figure": str(out / "dose_response.png")}
    doc = json.loads((out / "steering.json").read_text())
    assert doc["sentences"] == result["sentences"] and len(doc["arms"]) == len(planted)
    with open(out / "steering.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [a["name"] for a in planted]
    d = rows[1]
    assert (d["kind"], float(d["alpha"]), d["traces"], float(d["accuracy_diff"])) == ("direction", 4.0, "8", 0.5)
    assert float(d["mean_tokens_diff_low"]) == 3.0 and float(d["answer_changed_diff_high"]) == 0.5
    assert rows[0]["accuracy_diff"] == "" and rows[-1]["alpha"] == ""  # the baseline has no change; ablation no alpha
    assert (out / "dose_response.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- simulation -----------------------------------------------------------------------------------

N_PROBLEMS, N_SAMPLES = 60, 4
GROUPS = np.repeat(np.arange(N_PROBLEMS), N_SAMPLES)


def simulated_differences(rng, effects, keep=0.8):
    """Per arm, per (problem, sample) pair: arm correct minus baseline correct, the two sampled with the same seed.

    Problem i is right with probability p_i (the baseline) or p_i + effects[arm][i] (the arm); a pair shares its
    uniform draw with probability `keep` (the same seed, a small shift), else the arm's is fresh. Each pair's
    expected difference is effects[arm][i] exactly while p_i + effects[arm][i] lies in [0, 1] (else clipped)."""
    p = rng.uniform(0.3, 0.6, N_PROBLEMS)[:, None]
    u = rng.random((N_PROBLEMS, N_SAMPLES))
    out = []
    for delta in effects:
        v = np.where(rng.random(u.shape) < keep, u, rng.random(u.shape))
        out.append(((v < np.clip(p + delta[:, None], 0, 1)).astype(float) - (u < p)).ravel())
    return np.array(out)


def coverage(true_effect, data_sets=1000):
    hits = 0
    for k in range(data_sets):
        rng = np.random.default_rng(1000 + k)
        effects = true_effect + rng.uniform(-0.25, 0.25, N_PROBLEMS)  # problems differ in how steering moves them
        diffs = simulated_differences(rng, [effects])
        lo, hi = paired_bootstrap(diffs, GROUPS, resamples=500, seed=k)["ci"][0]
        hits += lo <= true_effect <= hi
    return hits / data_sets


@pytest.mark.parametrize("true_effect", [0.0, 0.1])
def test_the_problem_bootstrap_ci_covers_the_true_paired_difference_95_percent_of_the_time(true_effect):
    # 1000 data sets: the coverage's own sampling error is 0.7 points, so 93-97% is a 3-sigma band around 95%.
    # Resampling traces instead of problems covers about 91% here: the problems' own effects make pairs of a
    # problem alike.
    assert 0.93 <= coverage(true_effect) <= 0.97


def test_the_bootstrap_is_reproducible_and_shares_its_draws():
    rng = np.random.default_rng(0)
    diffs = simulated_differences(rng, [np.full(N_PROBLEMS, 0.1), np.zeros(N_PROBLEMS)])
    a, b = paired_bootstrap(diffs, GROUPS, 300, seed=4), paired_bootstrap(diffs, GROUPS, 300, seed=4)
    assert np.array_equal(a["draws"], b["draws"])
    # the same drawn problems for both rows: a row's draws equal its own bootstrap run alone
    alone = paired_bootstrap(diffs[1:], GROUPS, 300, seed=4)
    assert np.array_equal(alone["draws"][0], a["draws"][1])
    assert a["value"][0] == pytest.approx(diffs[0].mean())


def specific_rate(direction_spread, controls=8, data_sets=400):
    """How often the direction is called specific when it is drawn like the random directions: each of the
    controls + 1 directions moves accuracy by a common -0.05 (any push hurts), problems by their own amount, and
    each direction by its own shift of sd `direction_spread`."""
    calls = 0
    for k in range(data_sets):
        rng = np.random.default_rng(5000 + k)
        common = -0.05 + rng.uniform(-0.25, 0.25, N_PROBLEMS)
        shifts = rng.normal(0, direction_spread, controls + 1)
        boot = paired_bootstrap(simulated_differences(rng, [common + s for s in shifts]), GROUPS, 500, seed=k)
        s = specificity(boot["value"][0], boot["ci"][0], boot["draws"][0], boot["value"][1:], boot["draws"][1:])
        calls += s["verdict"] == "specific"
    return calls / data_sets


def test_the_specific_verdict_is_rare_when_the_direction_is_like_the_random_ones():
    # Every direction with the same effect: 'specific' needs the contrast's 95% CI to exclude 0, which (the
    # contrast being 0) it does about 5% of the time, and the range and the direction's own CI cut that further.
    # 400 data sets: a 5% bound sits 3 sigma above a true 2.5%.
    assert specific_rate(0.0) <= 0.05
    # Directions that differ among themselves: the bootstrap sees problems, not directions, so the range check
    # carries the verdict; by exchangeability the direction lies outside the range of 8 others with probability
    # 2 / 9 (ties only lower it), so that is the bound (plus 3 sigma of 400 data sets).
    assert specific_rate(0.1) <= 2 / 9 + 3 * np.sqrt(2 / 9 * 7 / 9 / 400)
