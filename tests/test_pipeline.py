"""pipeline.py: options split between the generator and the probes, checked before anything is created; the
chunk probe and `score` behind the CLI."""

import csv
import json

import pytest
from click.testing import CliRunner

from conftest import synth_store
from tribunal.cli import main
from tribunal.errors import TribunalError
from tribunal.pipeline import chunk_probe, run_pipeline, score_stores, split_options
from tribunal.probes import directions as dirs
from tribunal.probes.run import probe_trajectory
from tribunal.store import open_store


def test_one_seed_goes_to_the_generator_and_the_probes():
    generate, probes = split_options({"seed": 5, "temperature": 0.7, "folds": 3, "margin": 0.1})
    assert generate == {"seed": 5, "temperature": 0.7}
    assert probes == {"seed": 5, "folds": 3, "margin": 0.1}
    with pytest.raises(TribunalError, match="bootstrap"):
        split_options({"bootstrap": 100})


@pytest.mark.parametrize("options, message", [({"shard": "3/2"}, "--shard"), ({"folds": 1}, "--folds"),
                                              ({"memory": "lots"}, "--memory"), ({"temperature": 0}, "--temperature"),
                                              ({"seed": -1}, "--seed"), ({"max_problems": 3}, "--max-problems 3"),
                                              ({"exit_policy": "p"}, "no --exit-policy"),
                                              ({"exit_rule": "confidence"}, "add --early-exit"),
                                              ({"exit_threshold": "1.5"}, "add --early-exit")])
def test_bad_run_options_are_refused_before_the_run_folder_exists(tmp_path, options, message):
    with pytest.raises(TribunalError, match=message):
        run_pipeline(tmp_path / "runs" / "x", options, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("options, message", [({"exit_threshold": "1.5"}, "outside"),
                                              ({"exit_threshold": "conformal:2"}, "conformal"),
                                              ({"engine": "vllm", "capture": "forward"}, "--capture inline")])
def test_a_bad_exit_policy_is_refused_before_the_first_run_samples(tmp_path, options, message):
    with pytest.raises(TribunalError, match=message):
        run_pipeline(tmp_path / "runs" / "x", options, progress=False, early_exit=True)
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    root = tmp_path_factory.mktemp("p")
    store = synth_store(root / "s.h5", traces=80, problems=20, layers=(2, 4), d_model=16, tokens_per_trace=(20, 40))
    probe_trajectory(store, root / "probes", aggregations="mean", permutations=0, folds=3, progress=False)
    return store, root / "probes"


def test_score_writes_into_a_new_folder(probed, tmp_path):
    store, directions = probed
    out = tmp_path / "new" / "deeper" / "scores.csv"
    result = score_stores(directions, store, out, layer=2, aggregation="mean")
    rows = list(csv.DictReader(out.open()))
    assert result["layer"] == 2 and len({r["trace"] for r in rows}) == 80


@pytest.mark.parametrize("bad, message", [({"layer": 9}, "no direction"), ({"chunk_ends": True}, "no chunk probe")])
def test_score_with_bad_input_leaves_nothing(probed, tmp_path, bad, message):
    store, directions = probed
    with pytest.raises(TribunalError, match=message):
        score_stores(directions, store, tmp_path / "new" / "scores.csv", **bad)
    assert not (tmp_path / "new").exists()


def test_chunk_probe_reads_chunk_ends_with_the_stores_tokenizer(tmp_path):
    store = synth_store(tmp_path / "c.h5", traces=80, problems=20, layers=(2, 4), d_model=16, chunk_signal=0.8)
    with pytest.raises(TribunalError, match="--margin"):
        chunk_probe(store, tmp_path / "bad", margin=2, progress=False)
    assert not (tmp_path / "bad").exists()
    done = chunk_probe(store, tmp_path / "out", cues="wait,hmm", permutations=0, folds=3, progress=False)
    assert done["result"]["traces"] == 80 and (tmp_path / "out" / "chunk_metrics.json").exists()


def test_submit_config_gives_the_probe_job_the_non_default_probe_options(tmp_path):
    from tribunal.pipeline import submit_config

    cfg = submit_config(tmp_path / "r", {"seed": 2, "max_new_tokens": 64, "folds": 3, "test_fraction": 0.3,
                                         "margin": 0.05}, ["--layers", "4"], shards=2)
    assert cfg.generate == {"seed": 2, "max_new_tokens": 64} and cfg.shards == 2
    assert cfg.probe_args == {"trajectory": ["--folds", "3", "--seed", "2", "--layers", "4"],
                              "tokens": ["--seed", "2", "--test-fraction", "0.3"],
                              "chunks": ["--folds", "3", "--seed", "2", "--margin", "0.05"]}
    with pytest.raises(TribunalError, match="--margin"):
        submit_config(tmp_path / "r", {"margin": 5})


def test_run_end_to_end_on_the_embedded_default(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--out", str(run), "--quiet", "--permutations", "5"])
    assert result.exit_code == 0, result.output
    for name in ("store.h5", "implicit_value_directions.json", "metrics.csv", "probe_results.png", "token_probe.png",
                 "report.md", "chunks.csv", "chunk_metrics.json", "chunk_probe.png", "early_exit.png"):
        assert (run / name).stat().st_size > 0, name
    report = (run / "report.md").read_text()
    assert "![probe results](probe_results.png)" in report and "![token probe](token_probe.png)" in report
    assert "The selection procedure (nested problem-grouped CV" in report and "## Calibration" in report
    first = next(line for line in report.splitlines()[1:] if line.strip())
    assert first.startswith(("**No evidence of a signal", "**The residual stream predicts")), first
    assert "## Does the model know mid-thought? Chunk probes and early exit" in report and "### Early exit" in report
    assert "Sampled by tribunal's hf engine, captured while decoding." in report
    doc = dirs.load(run)
    assert "chunk" in doc and "early_exit" in doc["chunk"]
    assert "trajectory" in doc and "token" in doc and doc["provenance"]["model"] == "tribunal/embedded-default"
    # resumed with --early-exit: nothing generated twice, then the same traces again with the run's own policy
    again = CliRunner().invoke(main, ["run", "--out", str(run), "--quiet", "--permutations", "5", "--early-exit",
                                      "--exit-threshold", "0"])
    assert again.exit_code == 0 and again.output.splitlines()[0].endswith(" 0 new tok/s"), again.output
    assert "exit report: FULL" in again.output
    exited_at_first_answering_chunk(run)
    validated(run)


def validated(run):
    """Resumed with --validate: the halves of the run's problems hold its traces between them, the probes transfer
    both ways, every steering arm samples the run's problems, and report.md says what came of it."""
    done = CliRunner().invoke(main, ["run", "--out", str(run), "--quiet", "--permutations", "5", "--validate",
                                     "--random-directions", "1", "--alpha", "0,4"])
    assert done.exit_code == 0, done.output
    halves = [run / "validate" / "halves" / f"{name}.h5" for name in ("short", "long")]
    with open_store(run) as full, open_store(halves[0]) as short, open_store(halves[1]) as long:
        assert short.n_traces + long.n_traces == full.n_traces
        assert not set(short.table["problem_id"].tolist()) & set(long.table["problem_id"].tolist())
        problems = len(set(full.table["problem_id"].tolist()))
    for way in ("short_to_long", "long_to_short"):
        assert (run / "validate" / f"transfer_{way}" / "transfer.png").stat().st_size > 0
    arms = sorted(p.name for p in (run / "validate" / "steering" / "arms").iterdir())
    assert arms == ["ablation", "baseline", "direction_a+4", "random0_a+4"]
    with open_store(run / "validate" / "steering" / "arms" / "baseline" / "store.h5") as baseline:
        assert len(set(baseline.table["problem_id"].tolist())) >= problems
    report = (run / "report.md").read_text()
    section = report[report.index("## Is it real?"):report.index("## Files")]
    assert "### Transfer between short and long questions" in section and section.count("| trajectory probe") == 2
    assert "![accuracy and length against alpha](validate/steering/dose_response.png)" in section
    assert "steering along the direction at alpha = 4 changes accuracy by" in section and "specificity screen" in section


def test_steering_options_need_validate(tmp_path):
    with pytest.raises(TribunalError, match="--random-directions sets the steering of `run --validate`: add --validate"):
        run_pipeline(tmp_path / "runs" / "x", {}, progress=False, steering={"random_directions": 2})
    with pytest.raises(TribunalError, match="--alpha"):
        run_pipeline(tmp_path / "runs" / "x", {}, progress=False, validate=True, steering={"alpha": "0"})
    assert not (tmp_path / "runs").exists()


def exited_at_first_answering_chunk(run):
    """Threshold 0: a trace exits at its first answering chunk (the tokens up to its last one are its thinking),
    as a prefix of its full twin, or (its first answering chunk only known at the end) is that twin."""
    (policy,) = json.loads((run / "early_exit" / "exit_report.json").read_text())["policies"]
    m = policy["measured"]
    first = {}
    for row in csv.DictReader((run / "chunks.csv").open()):
        first.setdefault(int(row["trace"]), int(row["token_end"]))
    with open_store(run) as full, open_store(run / "early_exit" / "store.h5") as exited:
        assert full.n_traces == m["pairs"] and full.exit_table is None  # RUN/*.h5 is the first run alone
        assert exited.attrs["generation_settings"]["exit_policy"]["probes"] == str(run)
        twin = {(int(r["problem_id"]), int(r["sample_index"])): e for r, e in zip(exited.table, exited.exit_table)}
        exits = [(i, int(e["thinking_tokens"])) for i, r in enumerate(full.table)
                 if (e := twin[int(r["problem_id"]), int(r["sample_index"])])["exit_chunk"] >= 0]
    assert policy["threshold"] == 0 and policy["only_in_full"] == 0 and m["prefix"]["matched"] == m["pairs"]
    assert all(n == first[i] + 1 for i, n in exits)
    assert len(first) >= m["exited"] > 0.8 * len(first) and m["tokens_saved"] > 0
    report = (run / "report.md").read_text()
    section = report[report.index("## Early exit, measured"):report.index("## Files")]
    assert "**probe >= 0" in section and "intermediate answer" in section
    assert "![probe rule](early_exit/exit_report_probe.png)" in section
    assert (run / "early_exit" / "exit_report_probe.png").stat().st_size > 0

