"""The live monitor and early exit on the embedded model: scores equal to the offline ones, exits that are
prefixes of their full twins, a threshold no chunk reaches changing nothing, and bad input refused."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.chunks import intermediate_answers, token_ends
from tribunal.cli import main
from tribunal.grading import ANSWER_CUE
from tribunal.probes.chunk_probe import score_chunk_ends
from tribunal.probes.directions import FORMAT, VERSION
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.generate import EXIT_INTERRUPTED, GenerateConfig, run_generation
from tribunal.traces.models import EMBEDDED_MODEL, EMBEDDED_MODEL_ID, piece_decoder

D_MODEL = json.loads((EMBEDDED_MODEL / "config.json").read_text())["hidden_size"]
RUN = dict(max_problems=4, samples_per_problem=2, max_new_tokens=160, batch_size=4, keep_all=True, progress=False,
           layers="2,5")


def probes_folder(path, chunk_layer=5, token_layer=2, model=EMBEDDED_MODEL_ID, d_model=D_MODEL, seed=0, **chunk):
    """A probes folder as `probe chunks` + `probe tokens` write it, with random directions (the monitor's
    arithmetic does not care whether they are good ones)."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(2, d_model))
    path.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "version": VERSION,
           "provenance": {"model": model, "d_model": d_model, "layers": sorted({2, 3, 5, chunk_layer, token_layer})},
           "chunk": {"direction": {"layer": chunk_layer, "direction": (u / np.linalg.norm(u)).tolist(),
                                   "weight_norm": 0.5, "bias": 0.1}, **chunk},
           "token": {"layer": token_layer, "midpoint": rng.normal(size=d_model).tolist(),
                     "directions": {"lda": {"direction": (v / np.linalg.norm(v)).tolist()}}}}
    (path / "implicit_value_directions.json").write_text(json.dumps(doc))
    return path, doc


def generate(tmp_path, name, **options):
    summary = run_generation(GenerateConfig(out=str(tmp_path / name), **{**RUN, **options}))
    assert summary["status"] == "done"
    return tmp_path / name


def traces_of(path):
    """{(problem, sample): trace, with its activations of every stored layer as .activations}, the exit table."""
    out = {}
    with open_store(path) as store:
        for i in range(store.n_traces):
            t = store.trace(i)
            t.activations = np.stack([store.activations(layer, i) for layer in store.layers])
            out[(t.problem_id, t.sample_index)] = t
        return out, store.exit_table


def generated(t):
    return list(t.token_ids[t.prompt_length:])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run without exit, monitored, and its probes folder."""
    tmp = tmp_path_factory.mktemp("monitor")
    probes, doc = probes_folder(tmp / "probes")
    return tmp, probes, doc, generate(tmp, "full.h5", monitor=str(probes))


def assert_monitor_is_offline(store, doc, folder) -> int:
    """The monitor's stored scores are the offline ones of the stored activations (token scores of layer 2, chunk
    ends and probabilities from `score_chunk_ends`, writing FOLDER/chunks.csv); returns the chunks scored. Shared
    with the vLLM engine's test (tests/traces/engines/test_vllm_inline.py)."""
    assert store.monitor_fields == ("chunk_probability", "token_score")
    offline = score_chunk_ends(doc, store, piece_decoder(store.model_id), folder / "chunks.csv")
    u = np.asarray(doc["token"]["directions"]["lda"]["direction"])
    offset = u @ np.asarray(doc["token"]["midpoint"])
    chunk_ends = []
    for i in range(store.n_traces):
        t = store.trace(i)
        online = t.monitor["chunk_probability"]
        assert np.isnan(online[: t.prompt_length]).all() and np.isnan(t.monitor["token_score"][: t.prompt_length]).all()
        chunk_ends += [(i, int(k) - t.prompt_length) for k in np.flatnonzero(~np.isnan(online))]
        layer2 = store.activations(2, i).astype(np.float64)
        np.testing.assert_allclose(t.monitor["token_score"][t.prompt_length:], (layer2 @ u - offset)[t.prompt_length:],
                                   rtol=1e-4, atol=1e-4)
    rows = [ln.split(",") for ln in (folder / "chunks.csv").read_text().splitlines()[1:]]
    assert chunk_ends == [(int(r[0]), int(r[3])) for r in rows]  # online chunk ends = offline ones
    online_p = np.concatenate([store.trace(i).monitor["chunk_probability"] for i in range(store.n_traces)])
    np.testing.assert_allclose(online_p[~np.isnan(online_p)], 1 / (1 + np.exp(-offline["logits"])), rtol=1e-5)
    return len(chunk_ends)


def test_monitor_scores_are_the_offline_scores_of_the_stored_activations(full_run):
    tmp, probes, doc, full = full_run
    with open_store(full) as store:
        assert assert_monitor_is_offline(store, doc, tmp) >= store.n_traces  # the model states answers on the way
        settings = store.attrs["generation_settings"]
        assert settings["monitor"]["chunk_layer"] == 5 and settings["exit_policy"] is None


def test_the_probe_layer_is_captured_when_it_is_not_stored(tmp_path, full_run):
    _, probes, _, full = full_run
    probes3, _ = probes_folder(tmp_path / "p3", chunk_layer=3, token_layer=3)
    stored = generate(tmp_path, "with3.h5", monitor=str(probes3), layers="2,3,5")
    unstored = generate(tmp_path, "without3.h5", monitor=str(probes3))
    a, _ = traces_of(stored)
    b, _ = traces_of(unstored)
    with open_store(unstored) as store:
        assert list(store.layers) == [2, 5]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key].monitor["chunk_probability"], b[key].monitor["chunk_probability"])
        np.testing.assert_array_equal(a[key].monitor["token_score"], b[key].monitor["token_score"])
        np.testing.assert_array_equal(a[key].activations[[0, 2]], b[key].activations)


def test_a_threshold_no_chunk_reaches_changes_nothing(tmp_path, full_run):
    _, probes, _, full = full_run
    never = generate(tmp_path, "never.h5", exit_policy=str(probes), exit_threshold="1")
    a, _ = traces_of(full)
    b, exits = traces_of(never)
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.activations, y.activations)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
        np.testing.assert_array_equal(x.entropies, y.entropies)
        np.testing.assert_array_equal(x.monitor["chunk_probability"], y.monitor["chunk_probability"])
        assert (x.text, x.label, x.predicted, x.finish_reason) == (y.text, y.label, y.predicted, y.finish_reason)
        assert y.exit["rule"] == "none" and y.exit["exit_chunk"] == -1 and y.exit["forced_tokens"] == 0
        assert y.exit["thinking_tokens"] == len(generated(y))


def first_chunk_end(t, tokenizer_pieces):
    """The offline first answering chunk of a full trace, and its last token (None when the trace has only its
    last chunk, which an online rule sees only once the trace is over)."""
    chunks = intermediate_answers(t.text, t.gold)
    if len(chunks) < 2:
        return None, None
    content = chunks[0].start + len(t.text[chunks[0].start : chunks[0].end].rstrip())
    return chunks[0], token_ends(tokenizer_pieces(generated(t)), t.text, [content])[0]


def test_threshold_zero_exits_at_the_first_answer_a_prefix_of_the_full_trace(tmp_path, full_run):
    _, probes, _, full = full_run
    early = generate(tmp_path, "zero.h5", exit_policy=str(probes), exit_threshold="0")
    a, _ = traces_of(full)
    b, exits = traces_of(early)
    pieces = piece_decoder(EMBEDDED_MODEL_ID)
    exited = 0
    for key, x in a.items():
        y = b[key]
        chunk, end = first_chunk_end(x, pieces)
        if chunk is None:
            assert y.exit["exit_chunk"] == -1 and generated(y) == generated(x)
            continue
        exited += 1
        assert y.exit["exit_chunk"] == 0 and y.exit["rule"] == "probe" and y.exit["thinking_tokens"] == end + 1
        assert generated(y) == generated(x)[: end + 1]  # the exited trace is a prefix of its full twin
        np.testing.assert_array_equal(y.activations, x.activations[:, : x.prompt_length + end + 1])
        np.testing.assert_array_equal(y.logprobs, x.logprobs[: x.prompt_length + end + 1])
        assert (y.label, y.predicted, y.finish_reason) == (chunk.label, chunk.answer, "other")
    assert exited >= len(a) // 2
    with open_store(early) as store:
        assert verify_store(store) == []
        assert store.attrs["generation_settings"]["exit_policy"]["threshold"] == 0


def test_forced_answers_follow_the_exit_chunk_within_their_budget(tmp_path, full_run):
    _, probes, _, full = full_run
    forced = generate(tmp_path, "forced.h5", exit_policy=str(probes), exit_threshold="0", exit_answer="forced",
                      exit_answer_budget=6)
    a, _ = traces_of(full)
    b, _ = traces_of(forced)
    from transformers import AutoTokenizer

    cue = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    graded = 0
    for key, y in b.items():
        if y.exit["exit_chunk"] < 0:
            continue
        x, k = a[key], y.exit["thinking_tokens"]
        gen = generated(y)
        assert gen[:k] == generated(x)[:k]
        assert gen[k : k + len(cue)] == cue
        assert y.exit["forced_tokens"] == len(gen) - k and len(cue) < y.exit["forced_tokens"] <= len(cue) + 6
        assert "</think>" in y.text and y.finish_reason in ("stop", "length")
        graded += y.label in ("correct", "incorrect")
    assert graded >= 1  # the model answers the cue
    # the answer was computed as if the dropped lookahead tokens had never been: a plain forward of the stored
    # tokens (prompt, thinking up to the exit chunk, cue, answer) gives the stored states
    from conftest import teacher_forced_states
    from tribunal.traces.models import decoder_blocks, load_model

    model, _ = load_model(None)
    checked = 0
    for y in b.values():
        if y.exit["exit_chunk"] >= 0 and checked < 3:
            ref = teacher_forced_states(model, decoder_blocks(model), y.token_ids, [2, 5])
            for j, layer in enumerate((2, 5)):
                np.testing.assert_allclose(y.activations[j], ref[layer], rtol=2e-2, atol=2e-2)
            checked += 1
    assert checked


def exit_command(probes, out):
    return [sys.executable, "-m", "tribunal.cli", "generate", "--out", str(out), "--exit-policy", str(probes),
            "--exit-threshold", "0.5", "--layers", "2,5", "--max-new-tokens", "160", "--samples-per-problem", "2",
            "--batch-size", "2", "--max-problems", "20", "--keep-all", "--quiet"]


def test_an_exit_run_killed_or_stopped_resumes_exactly_once(tmp_path, full_run, python_env):
    from .test_generate import wait_for_commits

    _, probes, _, _ = full_run
    for sig, name in ((signal.SIGKILL, "kill.h5"), (signal.SIGUSR1, "usr1.h5")):
        out = tmp_path / name
        proc = subprocess.Popen(exit_command(probes, out), env=python_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        wait_for_commits(out, 1, proc)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        if sig == signal.SIGUSR1:
            assert proc.returncode == EXIT_INTERRUPTED
        done = subprocess.run(exit_command(probes, out), env=python_env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        with open_store(out) as store:
            assert verify_store(store) == []
            pairs = sorted(zip(store.table["problem_id"].tolist(), store.table["sample_index"].tolist()))
            assert pairs == [(p, s) for p in range(20) for s in range(2)]  # each pair once
            assert store.exit_table is not None and len(store.exit_table) == store.n_traces


@pytest.mark.parametrize("probes_kw, args, needle", [
    ({"model": "someone/other-model"}, [], "were fit on model 'someone/other-model'"),
    ({"d_model": 64}, [], "have d_model 64, the model 128"),
    ({"chunk_layer": 11}, [], "layer 11 is not among"),
    ({"chunking": {"cues": ["wait"], "extra": "Step"}}, [], "online chunking cannot follow"),
    ({}, ["--exit-threshold", "1.5"], "outside [0, 1]"),
    ({}, ["--exit-threshold", "conformal:0.05"], "needs the probing store's calibration data"),
    ({}, ["--exit-threshold", "auto"], "`auto` needs the exit thresholds"),
    ({}, ["--exit-answer", "forced", "--no-chat-template"], "no end-of-thinking marker"),
])
def test_bad_exit_input_is_refused_in_one_line_with_nothing_written(tmp_path, probes_kw, args, needle):
    probes, _ = probes_folder(tmp_path / "probes", **probes_kw)
    out = tmp_path / "x.h5"
    result = CliRunner().invoke(main, ["generate", "--out", str(out), "--exit-policy", str(probes), "--exit-threshold",
                                       "0.5", *args, "--max-problems", "4", "--quiet"])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob("x.h5*"))


@pytest.mark.parametrize("args, needle", [
    (["--exit-rule", "confidence"], "--exit-rule needs --exit-policy"),
    (["--monitor", "P", "--engine", "vllm", "--capture", "forward"], "use --capture inline"),
    (["--monitor", "P", "--exit-policy", "Q"], "name different probes folders"),
])
def test_exit_options_that_do_not_fit_together(tmp_path, args, needle):
    out = tmp_path / "x.h5"
    result = CliRunner().invoke(main, ["generate", "--out", str(out), *args, "--quiet"])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert not out.exists()
