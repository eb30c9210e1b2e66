"""The exit report on hand-built stores: a three-problem case whose every figure is recomputed by hand."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.errors import TribunalError
from tribunal.probes.directions import FORMAT
from tribunal.report.exit_report import exit_report, is_prefix, pair_keys, problem_bootstrap
from tribunal.store import StoreWriter, TraceRecord

# one token per piece; a trace's text is its pieces joined, so decode_pieces spells it exactly
VOCAB = ["x is 2.", "\n\n", "So 5.", "x is 3.", "So 3.", "So 7.", "x is 1.", "So 4.", "</think>", "\\boxed{", "}"]
PROMPT = [20, 21]
GOLD = {0: "5", 1: "7", 2: "4", 3: "4"}
FORCED = [8, 9, 10]  # three forced-answer tokens
LAYER, D = 1, 4
SETTINGS = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "engine": "hf"}


def ids(*pieces):
    return [VOCAB.index(p) for p in pieces]


# (problem, sample) -> generated tokens of the run without exit, and whether its final answer is correct
FULL = {
    (0, 0): (ids("x is 2.", "\n\n", "So 5.", "\n\n", "So 5.", "\n\n", "So 5."), True),  # 7 tokens
    (0, 1): (ids("So 5.", "\n\n", "x is 3.", "\n\n", "So 3."), False),  # 5
    (1, 0): (ids(*["So 7.", "\n\n"] * 4, "So 7."), True),  # 9
    (2, 0): (ids("x is 1.", "\n\n", "So 4."), True),  # 3
    (2, 1): (ids("So 4."), True),  # 1; only in FULL
}
# confidence (exp mean log-prob) and the probe's x[0] at each answering chunk (chunk ends: tokens 0, 2, 4, ...)
CONFIDENCE = {(0, 0): [0.5, 0.9, 0.9, 0.9], (0, 1): [0.9, 0.5, 0.5], (1, 0): [0.5, 0.5, 0.85, 0.5, 0.5],
              (2, 0): [0.95, 0.5], (2, 1): [0.5]}
PROBE_X = {(0, 0): [-1, -1, 1, -1], (0, 1): [-1, -1, -1], (1, 0): [1, -1, -1, -1, -1], (2, 0): [-1, 1], (2, 1): [-1]}


def record(key, gen, correct, *, conf=None, x0=None, exit=None):
    n = len(PROMPT) + len(gen)
    logprob = np.zeros(len(gen))
    acts = np.zeros((1, n, D), np.float32)
    for k, end in enumerate(range(0, len(gen), 2)):  # chunk k spans tokens [end - 1, end] (token 0 alone)
        if conf is not None and k < len(conf):
            logprob[max(end - 1, 0) : end + 1] = math.log(conf[k])
        if x0 is not None and k < len(x0):
            acts[0, len(PROMPT) + end, 0] = x0[k]
    return TraceRecord(problem_id=key[0], sample_index=key[1], token_ids=np.array(PROMPT + gen),
                       prompt_length=len(PROMPT), activations=acts, label="correct" if correct else "incorrect",
                       text="".join(VOCAB[t] for t in gen), gold=GOLD[key[0]], logprobs=logprob,
                       entropies=np.zeros(len(gen)), exit=exit)


def write(path, records, settings, exit_table=False):
    with StoreWriter(path, model_id="test/model", layers=(LAYER,), d_model=D, chunk_tokens=32, dataset_id="d",
                     seed=3, generation_settings=settings, exit_table=exit_table) as w:
        w.append(records)
    return path


def exited(key, chunk, thinking, forced, correct, rule, first=None):
    """A trace of an exit run: the full twin's first `thinking` tokens (`first` replaces its first token) and
    `forced` forced-answer tokens; chunk -1 = it ran to the end."""
    gen = list(FULL[key][0][:thinking]) + FORCED[:forced]
    if first is not None:
        gen[0] = first
    e = {"exit_chunk": chunk, "rule": rule if chunk >= 0 else "none", "score": 0.9 if chunk >= 0 else None,
         "thinking_tokens": thinking, "forced_tokens": forced}
    return record(key, gen, correct, exit=e)


def decode_pieces(token_ids):
    return [VOCAB[t] for t in token_ids]


@pytest.fixture
def case(tmp_path):
    return build_case(tmp_path)


def build_case(tmp_path):
    """FULL (five traces of three problems and one unpaired), a confidence-rule run and a forced probe-rule run."""
    probes = tmp_path / "probes"
    probes.mkdir()
    # probability = sigmoid(2 * x[0]): 0.88 where x[0] = 1, 0.12 where -1
    (probes / "implicit_value_directions.json").write_text(json.dumps(
        {"format": FORMAT, "version": 1, "chunk": {"direction": {"layer": LAYER, "direction": [1.0, 0, 0, 0],
                                                                 "weight_norm": 2.0, "bias": 0.0}}}))
    full = write(tmp_path / "full.h5",
                 [record(k, g, c, conf=CONFIDENCE[k], x0=PROBE_X[k]) for k, (g, c) in FULL.items()], SETTINGS)
    policy = {"probes": str(probes), "threshold_how": {}, "answer_cue": "", "answer_budget": 8}
    conf = write(tmp_path / "conf.h5", [
        exited((0, 0), 1, 3, 0, True, "confidence"),
        exited((0, 1), 1, 3, 0, False, "confidence"),
        exited((1, 0), -1, 9, 0, True, "confidence"),
        exited((2, 0), 0, 1, 0, False, "confidence", first=VOCAB.index("So 4.")),  # not its twin's first token
        record((3, 0), ids("So 4."), True, exit={"exit_chunk": -1, "rule": "none", "score": None,
                                                 "thinking_tokens": 1, "forced_tokens": 0}),  # only here
    ], {**SETTINGS, "exit_policy": {**policy, "rule": "confidence", "threshold": 0.8, "threshold_spec": "0.8",
                                    "answer": "intermediate"}}, exit_table=True)
    probe = write(tmp_path / "probe.h5", [
        exited((0, 0), 2, 5, 3, True, "probe"),
        exited((0, 1), -1, 5, 0, False, "probe"),
        exited((1, 0), 0, 1, 3, True, "probe"),
        exited((2, 0), 1, 3, 3, True, "probe"),
    ], {**SETTINGS, "exit_policy": {**policy, "rule": "probe", "threshold": 0.5, "threshold_spec": "auto",
                                    "answer": "forced"}}, exit_table=True)
    return {"full": full, "conf": conf, "probe": probe, "probes": probes, "out": tmp_path / "report"}


def test_the_exit_reports_figures_recomputed_by_hand_on_a_three_problem_case(case):
    doc = exit_report(case["full"], [case["conf"], case["probe"]], case["out"], decode_pieces, resamples=500)
    conf, probe = doc["policies"]
    # paired: (0,0) (0,1) (1,0) (2,0); full tokens 7 + 5 + 9 + 3 = 24, full accuracy 3/4
    m = conf["measured"]
    assert (m["pairs"], m["problems"], conf["only_in_full"], conf["only_in_exited"]) == (4, 3, 1, 1)
    assert (m["full_tokens"], m["exited_tokens"], m["forced_tokens"]) == (24, 3 + 3 + 9 + 1, 0)
    assert m["tokens_saved"] == pytest.approx(1 - 16 / 24)
    assert (m["full_accuracy"], m["exited_accuracy"], m["accuracy_change"]) == (0.75, 0.5, -0.25)
    assert m["prefix"] == {"matched": 3, "share": 0.75, "exited_matched": 2, "exited": 3, "not_exited_identical": 1,
                           "not_exited": 1}
    assert m["exited"] == 3 and m["exits_by_rule"] == {"confidence": 3}
    # simulated, confidence >= 0.8 on the full traces: stops after tokens 3, 1, 5, 1 answering 5 (right), 5 (right,
    # where the full trace ended wrong), 7 (right), 1 (wrong)
    s = conf["simulated"]
    assert s["tokens_saved"] == pytest.approx(1 - 10 / 24) and s["accuracy_change"] == pytest.approx(0.0)
    assert (s["traces"], s["exited"], s["answer"]) == (4, 4, "intermediate")

    m = probe["measured"]  # forced answers: 3 tokens each after 5, 1 and 3 thinking tokens; (0,1) never exited
    assert (m["exited_tokens"], m["forced_tokens"]) == (8 + 5 + 4 + 6, 9)
    assert m["tokens_saved"] == pytest.approx(1 / 24) and m["accuracy_change"] == 0.0
    assert m["prefix"]["matched"] == 4 and m["exits_by_rule"] == {"probe": 3}
    # simulated, sigmoid(2 x0) >= 0.5: stops after tokens 5, never, 1, 3; answers as the full traces did
    s = probe["simulated"]
    assert s["tokens_saved"] == pytest.approx(1 - 14 / 24) and s["accuracy_change"] == pytest.approx(0.0)
    assert s["exited"] == 3
    for p in (conf, probe):
        for r in (p["measured"], p["simulated"]):
            for name in ("tokens_saved", "accuracy_change"):
                lo, hi = r[f"{name}_ci"]
                assert lo <= r[name] + 1e-12 and r[name] <= hi + 1e-12, (p["rule"], name, r[name], lo, hi)


def test_the_report_writes_json_markdown_and_one_plot_per_rule(case):
    doc = exit_report(case["full"], [case["conf"], case["probe"]], case["out"], decode_pieces, resamples=200)
    out = case["out"]
    assert json.loads((out / "exit_report.json").read_text())["policies"][0]["rule"] == "confidence"
    md = (out / "exit_report.md").read_text()
    assert "| confidence >= 0.8, intermediate answer | 4 | 3 | 3/4 | +33.3%" not in md  # saved is unsigned
    assert "| confidence >= 0.8, intermediate answer | 4 | 3 | 3/4 | 33.3% [" in md
    assert "Of those that exited, 2 of 3 are token-for-token prefixes" in md
    assert "predict the intermediate-answer variant" in md  # the forced run's caveat
    assert "1 trace only in FULL, 1 trace only in this store" in md
    for rule in ("confidence", "probe"):
        png = out / f"exit_report_{rule}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prefix of the full twin 3/4" in doc["summary"]


def test_stores_of_other_settings_or_without_a_policy_are_refused(case, tmp_path):
    other = write(tmp_path / "hot.h5", [exited((0, 0), 1, 3, 0, True, "confidence")],
                  {**SETTINGS, "temperature": 0.7, "exit_policy": {"rule": "confidence", "threshold": 0.8}},
                  exit_table=True)
    with pytest.raises(TribunalError, match="temperature: 1.0 in FULL, 0.7 here"):
        exit_report(case["full"], [other], tmp_path / "r1", decode_pieces)
    with pytest.raises(TribunalError, match="without an exit policy"):
        exit_report(case["full"], [case["full"]], tmp_path / "r2", decode_pieces)
    with pytest.raises(TribunalError, match="FULL .* was sampled with an exit policy"):
        exit_report(case["conf"], [case["probe"]], tmp_path / "r3", decode_pieces)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))  # nothing written


def test_the_problem_bootstrap_is_reproducible_and_covers_the_truth():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 2)
    args = (groups, rng.integers(5, 50, 80), rng.integers(1, 50, 80), rng.random(80) < 0.6, rng.random(80) < 0.5)
    a, b = problem_bootstrap(*args, resamples=300, seed=1), problem_bootstrap(*args, resamples=300, seed=1)
    assert a == b and a != problem_bootstrap(*args, resamples=300, seed=2)
    # coverage: 200 data sets of 40 problems whose exit run saves 30% of tokens in expectation
    hits = 0
    for k in range(200):
        rng = np.random.default_rng(100 + k)
        full = rng.integers(10, 100, 80).astype(float)
        ex = np.round(full * rng.uniform(0.4, 1.0, 80))
        r = problem_bootstrap(groups, full, ex, rng.random(80) < 0.5, rng.random(80) < 0.5, resamples=400, seed=k)
        hits += r["tokens_saved_ci"][0] <= 0.3 <= r["tokens_saved_ci"][1]
    assert hits >= 0.9 * 200, hits


def test_pairs_and_prefixes_on_plain_arrays():
    p = pair_keys([(0, 0), (0, 1), (2, 0)], [(2, 0), (0, 0), (5, 1)])
    assert p["full"].tolist() == [0, 2] and p["exited"].tolist() == [1, 0]
    assert p["only_full"] == [(0, 1)] and p["only_exited"] == [(5, 1)]
    full = np.array([1, 2, 3, 4, 5])
    assert is_prefix(full, np.array([1, 2, 3, 9, 9]), 1, 2, exited=True)  # forced tokens after the thinking differ
    assert not is_prefix(full, np.array([1, 7, 3]), 1, 2, exited=True)
    assert not is_prefix(full, np.array([1, 2, 3]), 1, 2, exited=False)  # no exit: must be the whole trace
    assert is_prefix(full, full.copy(), 1, 4, exited=False)


def test_the_cli_writes_the_report(case, monkeypatch):
    import tribunal.traces.models
    from tribunal.cli import main

    asked = []
    monkeypatch.setattr(tribunal.traces.models, "piece_decoder",  # the test model has no tokenizer on disk
                        lambda model_id, tokenizer=None: asked.append((model_id, tokenizer)) or decode_pieces)
    result = CliRunner().invoke(main, ["exit-report", str(case["full"]), str(case["conf"]), str(case["probe"]),
                                       "--out", str(case["out"]), "--resamples", "200", "--tokenizer", "tok"])
    assert result.exit_code == 0, result.output
    assert "tokens saved 33.3%" in result.output
    assert (case["out"] / "exit_report.md").exists() and asked == [("test/model", "tok")]


def test_stores_without_per_trace_seeds_are_paired_with_a_note_on_what_pairing_means(case, tmp_path):
    """vLLM's CPU build with chunked prefill cannot seed each trace: the report still pairs, and says that a pair
    then shares its prompt and settings, not its randomness."""
    policy = {"probes": str(case["probes"]), "rule": "confidence", "threshold": 0.8, "threshold_spec": "0.8",
              "answer": "intermediate", "threshold_how": {}, "answer_cue": "", "answer_budget": 8}
    unseeded = write(tmp_path / "unseeded.h5", [exited((0, 0), 1, 3, 0, True, "confidence")],
                     {**SETTINGS, "per_trace_seeds": False, "exit_policy": policy}, exit_table=True)
    doc = exit_report(case["full"], [unseeded], tmp_path / "r", decode_pieces, resamples=50)
    assert "not its randomness" in doc["pairing_note"] and "note: some of these stores" in doc["summary"]
    assert "**Pairing.**" in (tmp_path / "r" / "exit_report.md").read_text()
    seeded = exit_report(case["full"], [case["conf"]], tmp_path / "s", decode_pieces, resamples=50)
    assert "pairing_note" not in seeded
