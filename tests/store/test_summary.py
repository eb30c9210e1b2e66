"""inspect's summary (tribunal/store/summary.py), end to end: synth -> inspect (--json, human, --trace) ->
verify through the CLI, in-process (CliRunner) and as real subprocesses; and an empty store."""

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from conftest import writer_kwargs
from tribunal.cli import main
from tribunal.store import StoreWriter, open_store

from .cli_output import one_line_error
from .monitored import monitored_kwargs, monitored_record

SYNTH = ["--traces", "60", "--problems", "15", "--layers", "3,6", "--d-model", "32", "--tokens-per-trace", "20-60",
         "--signal", "0.75", "--quiet"]


def test_synth_inspect_verify_with_clirunner(tmp_path):
    out = tmp_path / "s.h5"
    runner = CliRunner()
    r = runner.invoke(main, ["synth", str(out), *SYNTH, "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(main, ["inspect", "--json", str(out)]).output)
    for key in ("traces", "tokens", "labels", "layers", "d_model", "dtype", "model", "schema_version"):
        assert key in info, key
    assert info["traces"] == 60 and info["layers"] == [3, 6] and info["d_model"] == 32 and info["dtype"] == "bfloat16"
    assert sum(info["labels"].values()) == 60 and info["schema_version"] == 1 and info["model"] == "tribunal/synthetic"
    assert info["bytes_per_token"] == 2 * 32 * 2
    r = runner.invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "all invariants hold" in r.output
    human = runner.invoke(main, ["inspect", str(out)]).output
    assert "traces" in human and "writer" in human and "v1" in human
    trace = runner.invoke(main, ["inspect", "--trace", "2", str(out)]).output
    assert "problem 0, sample 2" in trace and "log-prob" in trace
    with open_store(out) as store:
        truth = store.attrs["synth"]
        assert truth["signal"] == 0.75 and store.shards[0].file["synth/direction"].shape == (32,)


def test_synth_inspect_verify_as_subprocesses(tmp_path, python_env):
    out = tmp_path / "s.h5"
    cli = [sys.executable, "-m", "tribunal.cli"]
    subprocess.run(cli + ["synth", str(out), *SYNTH], check=True, env=python_env, capture_output=True)
    info = json.loads(subprocess.run(cli + ["inspect", "--json", str(out)], check=True, env=python_env,
                                     capture_output=True, text=True).stdout)
    assert info["traces"] == 60
    done = subprocess.run(cli + ["verify", str(out)], env=python_env, capture_output=True, text=True)
    assert done.returncode == 0
    bad = subprocess.run(cli + ["verify", str(tmp_path / "missing.h5")], env=python_env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == f"Error: {tmp_path / 'missing.h5'} does not exist"


def test_empty_store(tmp_path):
    path = tmp_path / "empty.h5"
    with StoreWriter(path, **writer_kwargs()):
        pass
    result = CliRunner().invoke(main, ["inspect", "--json", str(path)])
    assert result.exit_code == 0 and '"traces": 0' in result.output
    assert CliRunner().invoke(main, ["verify", str(path)]).exit_code == 0
    one_line_error(["inspect", "--trace", "0", str(path)], "does not exist")


EXIT_RUN = {"monitor": {"probes": "run/probes", "chunk_layer": 3, "token_layer": 5},
            "exit_policy": {"probes": "run/probes", "rule": "probe", "threshold_spec": "auto", "threshold": 0.8,
                            "threshold_how": {}, "answer": "forced", "answer_cue": "The answer is", "answer_budget": 16}}


def test_inspect_shows_monitor_scores_and_the_exit_policy(tmp_path):
    path = tmp_path / "s.h5"
    recs = [monitored_record(i) for i in range(8)]  # odd traces exit: 3 by rule probe, 1 by confidence
    with StoreWriter(path, **monitored_kwargs(generation_settings=EXIT_RUN)) as w:
        w.append(recs)
    runner = CliRunner()
    info = json.loads(runner.invoke(main, ["inspect", "--json", str(path)]).output)
    assert info["monitor"] == {"fields": ["chunk_probability", "token_score"], "settings": EXIT_RUN["monitor"]}
    assert info["exit"]["exited"] == 4 and info["exit"]["by_rule"] == {"probe": 3, "confidence": 1}
    assert info["exit"]["forced_tokens"] == 12 and info["exit"]["policy"]["threshold"] == 0.8
    human = runner.invoke(main, ["inspect", str(path)]).output
    assert "chunk_probability, token_score (chunk probe layer 3, token direction layer 5" in human
    assert "rule probe >= 0.8 (auto), answer forced; 4 of 8 traces exited (3 probe, 1 confidence)" in human
    trace = runner.invoke(main, ["inspect", "--trace", "3", str(path)]).output
    assert "early exit: rule confidence fired at answering chunk 3 (score 0.705): 29 thinking + 3 forced" in trace
    ends = np.flatnonzero(~np.isnan(recs[3].monitor["chunk_probability"]))
    for i, pos in enumerate(ends):  # every chunk probability, at its token
        assert f"chunk {i:3d}  token {pos:6d}  p {recs[3].monitor['chunk_probability'][pos]:.3f}" in trace
    scores = recs[3].monitor["token_score"][recs[3].prompt_length:]
    assert f"token_score over {len(scores)} tokens: first {scores[0]:.3f}, last {scores[-1]:.3f}" in trace
    assert "early exit: none (thought to the end" in runner.invoke(main, ["inspect", "--trace", "2", str(path)]).output
    assert "log-prob, entropy, token_score" in trace  # a column of the token table
    with StoreWriter(tmp_path / "plain.h5", **writer_kwargs()) as w:  # a store without them says nothing of them
        w.append([monitored_record(0, monitor=False, exit=False)])
    info = json.loads(runner.invoke(main, ["inspect", "--json", str(tmp_path / "plain.h5")]).output)
    assert info["monitor"] is None and info["exit"] is None
    for args in (["inspect"], ["inspect", "--trace", "0"]):
        output = runner.invoke(main, [*args, str(tmp_path / "plain.h5")]).output
        output = output.replace(str(tmp_path), "TMP")  # the test's folder name holds "monitor"
        assert "early exit" not in output and "monitor" not in output and "token_score" not in output, output


def test_inspect_says_a_store_is_steered(tmp_path):
    from conftest import make_record, writer_kwargs
    from tribunal.store import StoreWriter
    from tribunal.store.summary import format_summary, summarize

    path = tmp_path / "arm.h5"
    how = {"arm": "direction_a+4", "kind": "add", "layer": 5, "alpha": 4.0, "sigma": 2.5, "direction": "probe",
           "random_index": None}
    with StoreWriter(path, **writer_kwargs(generation_settings={"intervention": how})) as w:
        w.append([make_record(0)])
    with open_store(path) as store:
        info = summarize(store)
        assert info["interventions"] == [{"store": str(path), **how}]
        line = format_summary(info).splitlines()[-1]
    assert line.startswith("STEERED") and "alpha +4 x sigma 2.5 along the probe direction at layer 5" in line
    assert "--allow-steered" in line
