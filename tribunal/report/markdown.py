"""report.md: one page a reader cannot misread. Each probe's headline opens its part and is said once, a null
reads as a null, and every figure says whether it is nested or per cell.

Two cells are named the same way throughout: the folds' choice (the cell each outer fold picks on its training
problems; the nested figures score these picks) and the direction cell (the same rule run on all problems; what
the directions file and `tribunal score` use). Why they can differ is said once, under "Two cells".
"""

from __future__ import annotations

from pathlib import Path

from ..probes import verdict
from ..probes.run import DIRECTIONS_FILE
from ..probes.transfer import fate
from ..probes.verdict import fmt_ci
from .outputs import CHUNK_FIGURE, EXIT_FIGURE, TOKEN_FIGURE, TRAJECTORY_FIGURE
from .plots import MIN_BIN_TRACES, merge_small_bins

FOLDS_CHOICE = "the folds' choice"
DIRECTION_CELL = "the direction cell"
EXIT_FOLDER = "early_exit"  # `run --early-exit`: the exit run's store and the measured report, inside the run folder
VALIDATE_FOLDER = "validate"  # `run --validate`: the halves' stores, the transfers and the steering arms
LABEL_ORDER = ("correct", "incorrect", "unparsed")


def write_report(path, generation: dict, traj: dict, tok: dict, seconds: float, chunks: dict | None = None,
                 exit_measured: dict | None = None, validation: dict | None = None) -> None:
    """generation: what run_generation returned; traj, tok, chunks: what the probes' outputs returned;
    exit_measured: what exit_report returned for `run --early-exit` (its files in EXIT_FOLDER), or
    {"not_measured": why} when there was nothing to measure; validation: what pipeline.validate_run returned
    for `run --validate`."""
    prov = traj["document"]["provenance"]
    result = traj["result"]
    sel = result["selection"]
    lines = [
        "# tribunal run report",
        "",
        f"**{verdict.headline(sel)}**",
        "",
        f"Model `{prov['model']}` ({prov['model_revision']}), layers {prov['layers']}, d_model {prov['d_model']}, "
        f"stored as {prov['dtype']}; dataset `{prov['dataset']['id']}` [{prov['dataset']['split']}]; "
        f"tribunal {prov['tribunal_version']}; {seconds:.0f} s in all. Sampled by "
        + "; ".join(sorted({s["sampled_by"] for s in prov["stores"]})) + ".",
        "",
        "## Traces",
        "",
        traces_paragraph(generation, prov),
        "",
        *two_cells(sel["final"]["folds"]),
        *trajectory_section(result),
        *calibration_section(sel),
        *token_section(tok["token"]),
    ]
    if chunks is not None:
        lines += chunk_section(chunks["result"])
    measured = exit_measured is not None and "not_measured" not in exit_measured
    if exit_measured is not None:
        lines += ["", "## Early exit, measured", "",
                  *(exit_measured_lines(exit_measured, f"{EXIT_FOLDER}/") if measured
                    else [f"Not measured: {exit_measured['not_measured'].rstrip('.')}."])]
    if validation is not None:
        lines += is_it_real_section(validation)
    lines += [
        "",
        "## Files",
        "",
        "- `store.h5`: the activation store (`tribunal inspect store.h5`)",
        f"- `{DIRECTIONS_FILE}`: the direction cell's directions (`tribunal score`), with every cell's per-cell "
        "metrics and baselines, the nested figures of the folds' choice (`selection`), and provenance",
        "- `metrics.csv`: every cell and baseline, one per-cell metric per row",
        "- `chunks.csv`: every chunk with its answer, label and nested held-out probability",
        "- `chunk_metrics.json`: the chunk probe's nested figures, its direction cell, and early exit",
        *([f"- `{EXIT_FOLDER}/`: the run with the exit policy (`store.h5`) and its measured report "
           "(`exit_report.md`, `exit_report.json`, a plot per rule)"] if measured else []),
        *([f"- `{VALIDATE_FOLDER}/`: the halves' stores (`halves/`), each transfer (`transfer_*/`: transfer.json, "
           "transfer.csv, transfer.png) and the steering arms (`steering/`: a store per arm, steering.json, "
           "steering.csv, dose_response.png)"] if validation is not None else []),
        "",
    ]
    Path(path).write_text("\n".join(lines))


def traces_paragraph(generation: dict, prov: dict) -> str:
    """What the store holds, and why fewer problems can hold traces than were tried."""
    labels = prov["labels"]
    names = [n for n in LABEL_ORDER if n in labels] + sorted(n for n in labels if n not in LABEL_ORDER)
    tried, shard, stored = generation["problems_tried"], generation["problems_in_shard"], prov["problems"]
    speed = generation["new_tokens"] / max(generation["seconds"], 1e-9)
    text = (f"{prov['traces']} traces in the store ({', '.join(f'{labels[n]} {n}' for n in names)}) from {stored} "
            f"problems, {generation['tokens']} tokens; this run sampled {speed:.0f} new tokens/s. Sampling ")
    text += (f"stopped when the label targets were met, after {tried} of the {shard} problems had all their samples "
             "graded" if generation["targets_met"] else
             f"went through {tried} of the {shard} problems without meeting the label targets")
    if stored < tried:
        text += (f". Only {stored} of them have a trace in the store: a graded trace whose label had already met "
                 "its target is not stored, so a problem can be tried and leave nothing")
    elif stored > tried:
        text += (f"; {stored} problems have a trace in the store, as problems still being sampled when the targets "
                 "were met keep the traces they had")
    return text + "."


def two_cells(folds: int) -> list[str]:
    """The two names, and why the cells they name can differ: said here once."""
    return [
        "## Two cells",
        "",
        "Each probe below searches over cells (a layer and an aggregation of the trace's activations; for chunks, a "
        "layer) and names two of them:",
        "",
        f"- **{FOLDS_CHOICE}**: each of the {folds} outer folds picks a cell by inner cross-validation on its "
        "training problems only and predicts its held-out problems with it. The *nested* figures (each headline) "
        "score these held-out predictions: they score the choosing, not one cell.",
        f"- **{DIRECTION_CELL}**: the same rule run once on all problems (the cell with the best problem-grouped CV "
        "ROC-AUC); the directions file and `tribunal score` use it. Its own figures are *per cell* and optimistic: "
        "it won the search on the problems it is scored on.",
        "",
        f"The two can differ: each fold chooses on {folds - 1}/{folds} of the problems by an inner CV, the direction "
        "cell is chosen on all of them by the outer CV, and when cells score about alike (as they do without a "
        "signal) a small change in the problems changes the winner.",
        "",
    ]


def folds_choice_sentence(selection: dict, unit: str) -> str:
    per_fold = selection["chosen_per_fold"]
    folds = sum(per_fold.values())
    if selection["folds_agree"]:
        (name,) = per_fold
        return f"{FOLDS_CHOICE.capitalize()}: all {folds} outer folds chose {_cell(name, unit)}."
    spread = ", ".join(f"{_cell(name, unit)} in {n}" for name, n in per_fold.items())
    return f"{FOLDS_CHOICE.capitalize()}: the {folds} outer folds chose {len(per_fold)} different {unit}s ({spread})."


def direction_cell_sentence(final: dict, metrics: dict, unit: str) -> str:
    name = f"layer {final['layer']}" + (f", `{final['aggregation']}`" if unit == "cell" else "")
    return (f"{DIRECTION_CELL.capitalize()}: {name}; {final['folds_won']} of {final['folds']} outer folds chose it. "
            f"Per cell (grouped CV over all problems, optimistic): ROC-AUC {fmt_ci(metrics['auroc'])}")


def _cell(name: str, unit: str) -> str:
    layer, _, agg = name.partition("/")
    return f"layer {layer}" + (f" `{agg}`" if agg and unit == "cell" else "")


def trajectory_section(result: dict) -> list[str]:
    sel = result["selection"]
    final, fw = sel["final"], sel["family_wise"]
    cell = next(c for c in result["cells"] if c["layer"] == final["layer"] and c["aggregation"] == final["aggregation"])
    rows = [f"| {name.replace('_', ' ')} | {fmt_ci(b['auroc'])} | {'yes' if cell['beats'].get(name) else 'no'} |"
            for name, b in cell["baselines"].items()]
    return [
        "## Does the residual stream know whether the trace is right?",
        "",
        f"The selection procedure ({sel['method']}) is what the headline scores, nested: its balanced accuracy is "
        f"{fmt_ci(sel['nested_metrics']['balanced_accuracy'])}. The headline's p is the family-wise permutation p "
        f"({fw['method']}); the per-cell p-values in `metrics.csv` are uncorrected for the search. "
        f"{result['intervals']}.",
        "",
        folds_choice_sentence(sel, "cell"),
        "",
        direction_cell_sentence(final, cell["metrics"], "cell") + "; " + "; ".join(verdict.claims(cell)) + ".",
        "",
        "| the direction cell's baselines (same folds) | ROC-AUC, per cell (95% CI) | the probe beats it |",
        "|---|---|---|",
        *rows,
        *[f"\nNote: {n}." for n in result["notes"]],
        "",
        f"![probe results]({TRAJECTORY_FIGURE})",
        "",
        "Top panels, one per aggregation: each cell's per-cell ROC-AUC by layer (grouped CV, 95% CIs) beside its "
        "baselines on the same folds, each with its own CI; the ring marks the direction cell, "
        "the dotted line is chance (0.5). Bottom: the held-out logits of the folds' choices (nested) for correct and "
        "incorrect traces, and the reliability diagram of those predictions before and after Platt scaling.",
        "",
    ]


def calibration_section(selection: dict) -> list[str]:
    bins = merge_small_bins(selection["calibration"]["reliability_curve"])
    return [
        "## Calibration",
        "",
        *[f"- {s}" for s in verdict.calibration_sentences(selection)],
        "",
        f"The nested predictions in ten equal-width bins; a bin of fewer than {MIN_BIN_TRACES} traces is merged with "
        "its neighbour, here and in the figure:",
        "",
        "| predicted P(correct) | mean predicted | fraction correct | traces |",
        "|---|---|---|---|",
        *[f"| {b['bin'][0]:.1f}-{b['bin'][1]:.1f} | {b['mean_predicted']:.2f} | {b['fraction_correct']:.2f} | "
          f"{b['count']} |" for b in bins],
        "",
    ]


def token_headline(token: dict) -> str:
    """The per-token probe's one sentence: which directions' held-out CIs clear 0.5."""
    dirs = token["directions"]
    figures = ", ".join(f"{name} {fmt_ci(d['auroc'])}" for name, d in dirs.items())
    above = [name for name, d in dirs.items() if d["auroc"]["ci"][0] > 0.5]
    where = f"at layer {token['layer']}, on {token['test_problems']} held-out problems"
    if not above:
        return (f"No evidence that single tokens tell correct from incorrect traces {where}: token ROC-AUC "
                f"{figures}; each 95% CI covers 0.5.")
    return (f"Single tokens tell correct from incorrect traces {where}: token ROC-AUC {figures}; the 95% CI of "
            f"{' and '.join(above)} lies above 0.5 ({len(dirs)} directions tried, not corrected for the choice).")


def token_section(token: dict) -> list[str]:
    dirs = token["directions"]
    nb = token["position_bins"]
    return [
        "## When does the signal appear? (per-token probe)",
        "",
        f"**{token_headline(token)}**",
        "",
        f"Each direction is fit on {token['train_tokens']} tokens of {token['train_problems']} problems and tested "
        f"on {token['test_tokens']} tokens of the other {token['test_problems']}. Held-out token ROC-AUC by "
        "relative position in the generated trace:",
        "",
        "| direction | " + " | ".join(f"{i * 100 // nb}-{(i + 1) * 100 // nb}%" for i in range(nb)) + " |",
        "|---|" + "---|" * nb,
        *[f"| {name} | " + " | ".join(f"{b['value']:.2f}" for b in d["auroc_by_position"]) + " |"
          for name, d in dirs.items()],
        "",
        f"![token probe]({TOKEN_FIGURE})",
        "",
        "First panel: the table's ROC-AUCs with their 95% CIs (dashed outlines). Then, for each direction, the mean "
        "projection of correct and incorrect traces' tokens by position (dashed outlines: 95% CI of the mean over "
        "held-out traces, mean +- 1.96 standard errors).",
    ]


def chunk_section(result: dict) -> list[str]:
    """Does the model know mid-thought, and the early exit that would follow from it."""
    sel = result["selection"]
    final = sel["final"]
    layer = next(c for c in result["layers"] if c["layer"] == final["layer"])
    head = verdict.headline(sel).replace("whether a trace is correct", "whether an intermediate answer is correct")
    rows = [f"| {FOLDS_CHOICE} (nested) | {fmt_ci(sel['nested_metrics']['auroc'])} | |"]
    rows += [f"| {name.replace('_', ' ')} baseline | {fmt_ci(b['auroc'])} | "
             f"{'yes' if result['beats'].get(name) else 'no'} |" for name, b in result["baselines"].items()]
    return [
        "",
        "## Does the model know mid-thought? Chunk probes and early exit",
        "",
        f"**{head}**",
        "",
        f"{result['chunks']} intermediate answers ({result['positive_rate']:.0%} correct) in {result['traces']} "
        f"traces of {result['problems']} problems; the headline is nested ({sel['method']}).",
        "",
        folds_choice_sentence(sel, "layer"),
        "",
        direction_cell_sentence(final, layer["metrics"], "layer") + ".",
        "",
        "| scorer (same folds) | chunk ROC-AUC (95% CI) | the folds' choice beats it |",
        "|---|---|---|",
        *rows,
        "",
        f"![chunk probe]({CHUNK_FIGURE})",
        "",
        "Top left: each layer's per-cell ROC-AUC (the ring marks the direction cell); top right: the folds' choice "
        "(nested) beside the baselines, one row each; bottom: the reliability diagram and held-out logits of the "
        "nested predictions.",
        *early_exit_section(result["early_exit"]),
    ]


def early_exit_section(exit_: dict) -> list[str]:
    rules = exit_["rules"]
    setting = {"probe": "threshold", "confidence": "threshold", "trial_answer": "threshold", "fixed_fraction": "fraction"}
    rows = [f"| {name.replace('_', ' ')} | {_pm(r['accuracy'], r['accuracy_ci'])} | "
            f"{_pm(r['accuracy_change'], r['accuracy_change_ci'], signed=True)} | "
            f"{_pm(r['tokens_saved'], r['tokens_saved_ci'], pct=True)} | "
            + (", ".join(f"{v:g}" for v in r["chosen_per_fold"]) + f" ({setting[name]})" if r["chosen_per_fold"]
               else "none: stops at the first answer") + " |" for name, r in rules.items()]
    return [
        "",
        "### Early exit",
        "",
        "Each rule stops a trace early and answers with the last intermediate answer by then: at the first chunk "
        "whose nested probe probability (or output confidence) reaches a threshold, at a fixed fraction of the "
        "tokens, or at the first intermediate answer. Each fold's setting is the largest token saving whose "
        f"training accuracy is no worse than the full traces' minus {exit_['margin']:.2f}; it is then scored on the "
        f"fold's held-out traces. The full traces' accuracy is {exit_['full']['accuracy']:.3f}. 95% CIs over "
        "problems:",
        "",
        "| rule | accuracy | change against full traces | generated tokens saved | setting per fold |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Verdict: {exit_['verdict']}.",
        "",
        f"![early exit]({EXIT_FIGURE})",
        "",
        "Top: accuracy against tokens used over every setting of each rule, each rule's nested choice a hollow "
        "marker (rules at one point show one inside another). Bottom: the table's accuracy change and tokens saved "
        "with their CIs, one row per rule.",
    ]


def _pm(value: float, ci, pct: bool = False, signed: bool = False) -> str:
    f = (lambda v: f"{v:+.1%}" if signed else f"{v:.1%}") if pct else (lambda v: f"{v:+.3f}" if signed else f"{v:.3f}")
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]"


def policy_label(p: dict) -> str:
    tau = "never" if p["threshold"] is None else f"{p['threshold']:g}"
    spec = f" ({p['threshold_spec']})" if p.get("threshold_spec") not in (None, "", str(p["threshold"])) else ""
    return f"{p['rule']} >= {tau}{spec}, {p['answer']} answer"


def exit_measured_lines(doc: dict, folder: str = "") -> list[str]:
    """What `exit-report` returned, as paragraphs and a table (exit_report.md, and report.md's "Early exit,
    measured" with the figures under `folder`)."""
    policies = doc["policies"]
    boot = policies[0]["measured"]["bootstrap"]
    rows = []
    for p in policies:
        m, s = p["measured"], p["simulated"]
        rows.append(f"| {policy_label(p)} | {m['pairs']} | {m['exited']} | {m['prefix']['matched']}/{m['pairs']} | "
                    f"{_pm(m['tokens_saved'], m['tokens_saved_ci'], pct=True)} | "
                    f"{_pm(s['tokens_saved'], s['tokens_saved_ci'], pct=True)} | "
                    f"{_pm(m['accuracy_change'], m['accuracy_change_ci'], signed=True)} | "
                    f"{_pm(s['accuracy_change'], s['accuracy_change_ci'], signed=True)} |")
    lines = [
        f"FULL is `{doc['full']['store']}` ({doc['full']['traces']} traces, model {doc['full']['model']}), sampled "
        "without early exit. Each row is one store sampled with the same model, data, seed and sampling settings "
        "and an exit policy; its traces are paired with FULL's by (problem, sample).", "",
        "Tokens saved = 1 - (the exit run's generated tokens, forced answers included) / (the full run's), over the "
        "paired traces. Accuracy change = the exit run's accuracy - the full run's, on the same pairs. Measured "
        f"95% CIs: paired problem bootstrap ({boot['resamples']} resamples, seed {boot['seed']}). Simulated: the "
        f"offline prediction on FULL's paired traces ({doc['simulation_note']}; 95% CIs from problem-level "
        "influence terms).", "",
        "| policy | pairs | exited | prefix of the full twin | tokens saved, measured | tokens saved, simulated | "
        "accuracy change, measured | accuracy change, simulated |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
    ]
    for p in policies:
        m, pre = p["measured"], p["measured"]["prefix"]
        said = [f"**{policy_label(p)}** (`{p['store']}`): {m['exited']} of {m['pairs']} paired traces exited early. "
                f"Of those that exited, {pre['exited_matched']} of {pre['exited']} are token-for-token prefixes of "
                f"their full twin; of those that did not, {pre['not_exited_identical']} of {pre['not_exited']} are "
                "identical to it."]
        if p["threshold"] is None:
            said.append(f"No threshold saves tokens: `{p.get('threshold_spec')}` found none on the probing store, so "
                        "the rule never fires, nothing exits, and this run repeats the full one.")
        if pre["matched"] < m["pairs"]:
            said.append("Traces that differ from their twin before the exit were not sampled alike (another engine, "
                        "or nondeterministic hardware): there the saving is not only the policy's.")
        said.append(f"Accuracy {m['full_accuracy']:.3f} without exit, {m['exited_accuracy']:.3f} with it; "
                    f"{m['full_tokens']} generated tokens without exit, {m['exited_tokens']} with it, of which "
                    f"{m['forced_tokens']} are forced-answer tokens.")
        if m["exits_by_rule"]:
            said.append("Exits by rule: " + ", ".join(f"{r} {n}" for r, n in m["exits_by_rule"].items()) + ".")
        if p["only_in_full"] or p["only_in_exited"]:
            said.append(f"Unpaired, so left out of every figure: {_traces(p['only_in_full'])} only in FULL, "
                        f"{_traces(p['only_in_exited'])} only in this store.")
        if p["answer"] == "forced":
            said.append("This run forces an answer after the exit; the simulation answers with the chunk's "
                        "intermediate answer, so its figures predict the intermediate-answer variant of this policy.")
        lines += [" ".join(said), ""]
    if doc.get("pairing_note"):
        lines += [f"**Pairing.** Note that {doc['pairing_note']}.", ""]
    for rule, figure in sorted({(p["rule"], p["figure"]) for p in policies}):
        lines += [f"![{rule} rule]({folder}{figure})", ""]
    lines.append("Each plot: tokens saved (x) against accuracy change (y) with 95% CIs; filled circles measured, "
                 "hollow squares simulated, a dotted line joining the two of one policy.")
    return lines


def _traces(n: int) -> str:
    return f"{n} trace" + ("" if n == 1 else "s")


def _transfer_rows(measured: dict) -> list[dict]:
    """Of a transfer's rows, the ones a reader needs: the trajectory cell and the chunk layer best in distribution,
    and the token probe's LDA direction on every token."""
    rows = measured["rows"]
    picked = []
    for kind, label in (("trajectory", "trajectory probe"), ("chunk", "chunk probe")):
        of_kind = [r for r in rows if r["kind"] == kind]
        if of_kind:
            best = max(of_kind, key=lambda r: r["in_distribution"]["value"])
            where = f"layer {best['layer']}" + (f", {best['aggregation']}" if kind == "trajectory" else "")
            picked.append({**best, "name": f"{label} ({where}; best in distribution)"})
    picked += [{**r, "name": f"token probe (layer {r['layer']}, LDA, every token)"} for r in rows
               if r["kind"] == "token" and r["aggregation"] == "lda:tokens"]
    return picked


def is_it_real_section(validation: dict) -> list[str]:
    """report.md's "Is it real?": transfer between the halves of the run's problems, in a table, and steering along
    the direction against random directions, in a plot and sentences."""
    lines = ["", "## Is it real?", "",
             "A probe that separates right from wrong traces on one set of problems may have learned that set. Two "
             "checks: does it hold on problems of another kind (transfer), and does moving the model along it change "
             "what the model does, more than moving it along random directions (steering)?"]
    if validation["transfer"]:
        lines += ["", "### Transfer between short and long questions", "",
                  "The run's problems split by the length of their question; each probe is fit on one half (grouped "
                  "CV there gives the in-distribution figure) and scored on the other. 95% CIs; \"falls to chance\": "
                  "the transferred CI covers 0.5.", "",
                  "| fit on | scored on | probe | AUROC in distribution | AUROC transferred | |", "|---|---|---|---|---|---|"]
        for t in validation["transfer"]:
            for r in _transfer_rows(t):
                lines.append(f"| {t['train']} | {t['test']} | {r['name']} | {fmt_ci(r['in_distribution'])} | "
                             f"{fmt_ci(r['transferred'])} | {fate(r['transferred'])} |")
        lines += ["", "Every cell, layer and baseline: " + ", ".join(f"`{t['folder']}/transfer.csv`"
                                                                    for t in validation["transfer"]) + "."]
    steering = validation.get("steering")
    if steering:
        lines += ["", "### Steering along the direction", "",
                  f"Every arm samples the same problems and seeds, with the residual leaving layer {steering['layer']} "
                  f"shifted at every generated position by alpha standard deviations (sigma = {steering['sigma']:.4g}) "
                  "of the direction's projection, along the direction and along random directions of the same norm; "
                  "one arm projects the direction out.", "",
                  f"![accuracy and length against alpha]({steering['folder']}/dose_response.png)", ""]
        lines += [f"- {line}" for line in steering["sentences"]]
        lines.append(f"- {specific_sentence(steering['specificity'])}")
    lines += [f"- {note}" for note in validation["notes"]] if validation["notes"] else []
    return lines


def specific_sentence(specificity: list[dict]) -> str:
    """Where, over every alpha and outcome, the direction's effect passed the specificity screen."""
    passed = {}
    for entry in specificity:
        if entry["verdict"] == "specific":
            passed.setdefault(entry["alpha"], []).append(entry["outcome"].replace("_", " "))
    if not passed:
        return "at no alpha does the direction's effect on any outcome pass the specificity screen"
    return "the direction's effect passes the specificity screen at " + "; ".join(
        f"alpha = {alpha:g} ({', '.join(outcomes)})" for alpha, outcomes in sorted(passed.items())) + \
        " (steering.json's `specificity` has every alpha and outcome)"
