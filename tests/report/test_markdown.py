"""report.md as a newcomer reads it, written from real probe results: each probe's headline once, no console
dumps or Python reprs, two named cells explained once, and the traces' problem counts explained."""

import pytest

from tribunal.probes import verdict
from tribunal.report.markdown import token_headline, traces_paragraph, write_report
from tribunal.report.plots import MIN_BIN_TRACES

from .test_outputs import probe_run


def generation(**changes):
    """What run_generation returns for a run that met its targets after 32 of 200 problems (the embedded demo)."""
    return {"status": "done", "problems_tried": 32, "problems_in_shard": 200, "traces": 120, "tokens": 7521,
            "labels": {"correct": 60, "incorrect": 60}, "targets_met": True, "seconds": 4.0, "new_tokens": 4800,
            **changes}


@pytest.fixture
def report(tmp_path_factory):
    run = probe_run(tmp_path_factory)
    out = run["out"]
    write_report(out / "report.md", generation(), run["traj"], run["tok"], 12.0, run["chunks"])
    return run, (out / "report.md").read_text()


def test_each_probe_kind_has_its_headline_once(report):
    run, text = report
    trajectory = verdict.headline(run["traj"]["result"]["selection"])
    chunk = verdict.headline(run["chunks"]["result"]["selection"]).replace(
        "whether a trace is correct", "whether an intermediate answer is correct")
    token = token_headline(run["tok"]["token"])
    for headline in (trajectory, token, chunk):
        assert text.count(headline) == 1, headline
        assert f"**{headline}**" in text
    first = next(line for line in text.splitlines()[1:] if line.strip())
    assert first == f"**{trajectory}**"  # the trajectory headline before any other sentence


def test_no_console_dumps_or_python_reprs(report):
    _, text = report
    assert "```" not in text  # no terminal summary pasted in
    assert "{'" not in text and '{"' not in text and "': " not in text
    assert "done: " not in text and "/200 problems tried" not in text  # the generate console line


def test_the_two_cells_have_one_name_each_and_one_explanation(report):
    run, text = report
    assert text.count("**the folds' choice**") == 1 and text.count("**the direction cell**") == 1  # defined once
    assert text.count("The two can differ") == 1
    for final in (run["traj"]["result"]["selection"]["final"], run["chunks"]["result"]["selection"]["final"]):
        assert f"The direction cell: layer {final['layer']}" in text
    assert text.count("The folds' choice: ") == 2  # the trajectory and chunk parts
    assert "Directions and `tribunal score` use" not in text  # the old, third name
    assert "nested" in text and "per cell" in text


def test_problems_tried_and_problems_stored_are_told_apart():
    prov = {"traces": 100, "problems": 28, "labels": {"incorrect": 50, "correct": 50, "unparsed": 0}}
    text = traces_paragraph(generation(), prov)
    assert text.startswith("100 traces in the store (50 correct, 50 incorrect, 0 unparsed) from 28 problems")
    assert "after 32 of the 200 problems had all their samples graded" in text
    assert "Only 28 of them have a trace in the store: a graded trace whose label had already met its target is " \
           "not stored" in text
    assert "Only" not in traces_paragraph(generation(problems_tried=28), prov)
    unmet = traces_paragraph(generation(targets_met=False, problems_tried=200), {**prov, "problems": 200})
    assert "went through 200 of the 200 problems without meeting the label targets" in unmet


def test_the_reliability_table_shows_no_bin_under_the_minimum(report):
    _, text = report
    table = text.split("| predicted P(correct) |")[1].split("\n\n")[0].splitlines()[2:]
    assert table and all(int(row.rstrip(" |").rsplit("|", 1)[1]) >= MIN_BIN_TRACES for row in table)


def test_the_early_exit_measured_section_links_the_exit_folders_plots(tmp_path_factory, tmp_path):
    from tribunal.report.exit_report import exit_report

    from .test_exit_report import build_case, decode_pieces

    run, case = probe_run(tmp_path_factory), build_case(tmp_path)
    measured = exit_report(case["full"], [case["conf"], case["probe"]], case["out"], decode_pieces, resamples=200)
    write_report(tmp_path / "report.md", generation(), run["traj"], run["tok"], 12.0, run["chunks"], measured)
    text = (tmp_path / "report.md").read_text()
    assert text.count("## Early exit, measured") == 1 and "![probe rule](early_exit/exit_report_probe.png)" in text
    assert "| probe >= 0.5 (auto), forced answer | 4 | 3 | 4/4 | 4.2% [" in text
    assert "- `early_exit/`: the run with the exit policy" in text
    write_report(tmp_path / "plain.md", generation(), run["traj"], run["tok"], 12.0, run["chunks"])
    assert "Early exit, measured" not in (tmp_path / "plain.md").read_text()
