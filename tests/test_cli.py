"""The `tribunal` command: options derived from their one definition, seeds that arrive, and bad input that
leaves nothing behind (every command that creates an output folder or file)."""

import json
import re

import pytest
from click.testing import CliRunner

from conftest import synth_store
from tribunal.cli import main
from tribunal.probes.config import ProbeConfig
from tribunal.probes.run import probe_trajectory
from tribunal.report.outputs import trajectory_outputs
from tribunal.traces.synthetic import SynthSettings


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=200)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synth_store(tmp_path_factory.mktemp("s") / "s.h5", traces=80, problems=20, layers=(2, 4), d_model=16,
                       tokens_per_trace=(20, 40))


@pytest.fixture(scope="module")
def chunk_store(tmp_path_factory):
    return synth_store(tmp_path_factory.mktemp("c") / "c.h5", traces=80, problems=20, layers=(2, 4), d_model=16,
                       chunk_signal=0.8)


def test_run_seed_reaches_every_probe(tmp_path):
    """`tribunal run --seed 3`: the probes draw their folds and permutation null from seed 3 (they used 0)."""
    run = tmp_path / "run"
    r = invoke("run", "--out", run, "--seed", 3, "--max-problems", 12, "--samples-per-problem", 4,
               "--max-new-tokens", 96, "--keep-all", "--permutations", 3, "--folds", 3, "--quiet")
    assert r.exit_code == 0, r.output
    settings = json.loads((run / "implicit_value_directions.json").read_text())["settings"]
    assert (settings["seed"], settings["token_seed"], settings["chunk_seed"]) == (3, 3, 3)
    for seed in (3, 0):
        probe_trajectory(run / "store.h5", tmp_path / f"seed{seed}", seed=seed, permutations=3, folds=3, progress=False)
    metrics = {name: (path / "metrics.csv").read_text() for name, path in
               (("run", run), ("3", tmp_path / "seed3"), ("0", tmp_path / "seed0"))}
    assert metrics["run"] == metrics["3"] != metrics["0"]


def flags_in(help_text: str, probes, own_stores: bool = False) -> dict:
    """Each probe option's flags in a help text; own_stores: a command that probes what it sampled (run, slurm
    submit), which takes no option that is only for stores given to it (--allow-steered)."""
    return {flag: flag in help_text for f in ProbeConfig.cli_fields(*probes) for flag in ProbeConfig.flags(f)
            if not (own_stores and f.metadata.get("given_stores"))}


@pytest.mark.parametrize("command, probes", [(["probe", "trajectory"], ["trajectory"]), (["probe", "tokens"], ["tokens"]),
                                             (["probe", "chunks"], ["chunks"]), (["run"], []),
                                             (["slurm", "submit"], ["trajectory", "tokens", "chunks"])])
def test_probe_options_come_from_probe_config(command, probes):
    text = invoke(*command, "--help").output
    own = command[0] in ("run", "slurm")
    assert all(flags_in(text, probes, own).values()), flags_in(text, probes, own)
    assert ("--allow-steered" in text) == (not own)
    others = {flag for f in ProbeConfig.cli_fields() if f not in ProbeConfig.cli_fields(*probes)
              for flag in ProbeConfig.flags(f)}
    assert not [flag for flag in others if f" {flag} " in text], others
    assert "--bootstrap" not in text and "--probe-memory" not in text
    if command != ["slurm", "submit"]:
        assert "[default: mean,last,last_k,max,mean_all]" in text or "aggregations" not in probes


def test_synth_options_come_from_synth_settings(tmp_path):
    text = invoke("synth", "--help").output
    for f in SynthSettings.cli_fields():
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--batch-tokens" not in text and "[default: 64-256]" in text and "[default: 4,8,12,16]" in text
    out = tmp_path / "s.h5"
    r = invoke("synth", out, "--traces", 8, "--problems", 2, "--tokens-per-trace", "20-30", "--signal-layers", "8,12",
               "--quiet")
    assert r.exit_code == 0, r.output
    from tribunal.store import open_store

    with open_store(out) as opened:
        truth = opened.attrs["synth"]
    expected = SynthSettings(traces=8, problems=2, tokens_per_trace="20-30", signal_layers="8,12").validate()
    assert truth["layers"] == list(expected.layers) == [4, 8, 12, 16] and truth["signal_layers"] == [8, 12]
    assert truth["tokens_per_trace"] == [20, 30] and truth["signal"] == expected.signal and truth["d_model"] == 64


def test_a_config_file_sets_probe_options(store, tmp_path):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("aggregations: [mean]\nfolds: 3\npermutations: 0\nC: 0.5\n")
    r = invoke("probe", "trajectory", store, "--out", tmp_path / "out", "--config", cfg, "--quiet")
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "out" / "implicit_value_directions.json").read_text())["settings"]
    assert settings["aggregations"] == ["mean"] and settings["folds"] == 3 and settings["C"] == 0.5
    cfg.write_text("bootstrap: 100\n")
    r = invoke("probe", "trajectory", store, "--out", tmp_path / "out2", "--config", cfg)
    assert r.exit_code == 2 and "unknown key(s) ['bootstrap']" in r.output and not (tmp_path / "out2").exists()


def test_slurm_submit_writes_the_probe_options_into_the_probe_job(tmp_path):
    run = tmp_path / "r"
    r = invoke("slurm", "submit", "--run-dir", run, "--seed", 4, "--folds", 3, "--test-fraction", 0.3,
               "--probe-arg=--layers", "--probe-arg=2")
    assert r.exit_code == 0, r.output
    lines = (run / "slurm" / "probe.sbatch").read_text().splitlines()
    trajectory = next(line for line in lines if "probe trajectory" in line)
    tokens = next(line for line in lines if "probe tokens" in line)
    assert trajectory.endswith("--quiet --folds 3 --seed 4 --layers 2") and tokens.endswith("--quiet --seed 4 --test-fraction 0.3")
    assert "--seed 4" in (run / "slurm" / "generate.sbatch").read_text()


def test_run_takes_the_exit_options_but_its_policy_is_its_own_probes():
    text = invoke("run", "--help").output
    assert "--early-exit" in text and "--exit-threshold" in text and "--exit-rule" in text
    option = re.compile(r"^\s+--exit-policy ", re.M)
    assert not option.search(text) and option.search(invoke("generate", "--help").output)


def bad_inputs(tmp_path, store, chunk_store):
    """(command line, what it creates when it succeeds) per command that writes an output folder or file."""
    new = tmp_path / "new"
    other = synth_store(tmp_path / "other.h5", traces=8, problems=2, layers=(1, 3), d_model=16, tokens_per_trace=(20, 30))
    return {
        "run shard": ["run", "--shard", "3/2", "--out", new / "x"],
        "run folds": ["run", "--folds", 1, "--out", new / "x"],
        "run exit threshold": ["run", "--exit-threshold", "0.5", "--out", new / "x"],
        "run early exit": ["run", "--early-exit", "--exit-threshold", "conformal:0", "--out", new / "x"],
        "probe trajectory": ["probe", "trajectory", tmp_path / "missing.h5", "--out", new],
        "probe trajectory layers": ["probe", "trajectory", store, "--layers", 9, "--out", new],
        "probe tokens": ["probe", "tokens", store, "--layer", 9, "--out", new],
        "probe chunks": ["probe", "chunks", chunk_store, "--folds", 1, "--out", new],
        "score": ["score", tmp_path / "missing.json", store, "--out", new / "x.csv"],
        "capture": ["capture", tmp_path / "missing.h5", "--out", new / "x.h5"],
        "merge": ["merge", store, other, "-o", new / "x.h5"],
        "slurm submit": ["slurm", "submit", "--run-dir", new, "--temperature", 0],
        "synth": ["synth", new / "x.h5", "--traces", 7, "--problems", 2],
        "generate": ["generate", "--out", new / "x.h5", "--shard", "3/2"],
    }


CASES = ["run shard", "run folds", "run exit threshold", "run early exit", "probe trajectory",
         "probe trajectory layers", "probe tokens", "probe chunks", "score", "capture", "merge", "slurm submit",
         "synth", "generate"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_in_one_line_and_leaves_nothing(tmp_path, store, chunk_store, case):
    r = invoke(*bad_inputs(tmp_path, store, chunk_store)[case])
    assert r.exit_code in (1, 2) and isinstance(r.exception, SystemExit), r.output  # no traceback
    assert r.output.strip().startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "new").exists(), sorted(p.name for p in (tmp_path / "new").rglob("*"))


def test_probe_and_score_name_what_is_wrong_with_their_input(tmp_path):
    """A layer the store lacks, too few problems for the folds, a direction of another width or layer."""
    one = synth_store(tmp_path / "one.h5", traces=40, problems=10, layers=(2, 4), d_model=24)
    runner = CliRunner()
    r = runner.invoke(main, ["probe", "trajectory", str(one), "--out", str(tmp_path / "o"), "--layers", "3", "--quiet"])
    assert r.exit_code == 1 and "layer(s) [3] are not in the store" in r.output
    few = synth_store(tmp_path / "few.h5", traces=12, problems=3, layers=(2, 4), d_model=24)
    r = runner.invoke(main, ["probe", "trajectory", str(few), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 1 and "too few for 5-fold" in r.output
    other = tmp_path / "wide.h5"
    synth_store(other, traces=40, problems=10, layers=(2, 4), d_model=32)
    trajectory_outputs(one, tmp_path / "o", layers=[2], aggregations=("mean",), permutations=20, progress=False)
    r = runner.invoke(main, ["score", str(tmp_path / "o"), str(other), "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and "d_model 24, the store 32" in r.output
    r = runner.invoke(main, ["score", str(tmp_path / "o"), str(one), "--layer", "4", "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and "no direction for layer 4" in r.output


@pytest.mark.parametrize("command", [["generate", "--out"], ["capture", "missing.h5", "--out"]])
def test_an_unknown_compute_dtype_is_a_usage_error_that_leaves_nothing(tmp_path, command):
    r = invoke(*command, tmp_path / "new" / "x.h5", "--compute-dtype", "bogus")
    assert r.exit_code == 2 and "Invalid value for '--compute-dtype'" in r.output, r.output
    assert not (tmp_path / "new").exists()
