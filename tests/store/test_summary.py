"""inspect's summary (tribunal/store/summary.py), end to end: synth -> inspect (--json, human, --trace) ->
verify through the CLI, in-process (CliRunner) and as real subprocesses; and an empty store."""

import json
import subprocess
import sys

from click.testing import CliRunner

from conftest import writer_kwargs
from tribunal.cli import main
from tribunal.store import StoreWriter, open_store

from .cli_output import one_line_error

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
