"""What the evidence allows a reader to say, in words: the headline, the selection, calibration, each cell.

The terminal summary and report.md both speak through these sentences, so they never disagree.
"""

from __future__ import annotations

import math

from .evaluation import calibration_verdict


def fmt_ci(m) -> str:
    return f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def is_null(selection: dict) -> bool:
    """No evidence of a signal: the nested CI covers 0.5, or the family-wise permutation p is not below 0.05."""
    ci = selection["nested_metrics"]["auroc"]["ci"]
    p = selection["family_wise"]["p"]
    return not ci[0] > 0.5 or (not math.isnan(p) and p >= 0.05)


def headline(selection: dict) -> str:
    """The first sentence: a null reads as a null before any number."""
    nested = selection["nested_metrics"]["auroc"]
    fw = selection["family_wise"]
    p = "not computed (--permutations 0)" if math.isnan(fw["p"]) else f"{fw['p']:.3f}"
    if is_null(selection):
        why = []
        if not nested["ci"][0] > 0.5:
            why.append("its 95% CI covers 0.5")
        if not math.isnan(fw["p"]) and fw["p"] >= 0.05:
            n = fw.get("permutations")
            at_floor = n is not None and fw["p"] <= 1 / (n + 1) + 1e-12
            why.append(f"the family-wise permutation p is {p}" + (
                f" ({n} permutations cannot give less: rerun with --permutations 99 or more)" if at_floor else ""))
        return (f"No evidence of a signal: the selection procedure's held-out ROC-AUC is {fmt_ci(nested)}, and "
                f"{' and '.join(why)}.")
    return (f"The residual stream predicts whether a trace is correct: the selection procedure's held-out ROC-AUC is "
            f"{fmt_ci(nested)} (nested, problem-grouped CV), family-wise permutation p = {p} (the headline's p: it "
            f"accounts for the search over all cells).")


def selection_sentences(selection: dict) -> list[str]:
    """The folds' choice (which cells the outer folds chose) and the direction cell (what the directions file and
    `score` use), by which rule: the names the report uses."""
    per_fold = selection["chosen_per_fold"]
    folds = sum(per_fold.values())
    final = selection["final"]
    if selection["folds_agree"]:
        (name,) = per_fold
        layer, _, agg = name.partition("/")
        out = [f"All {folds} outer folds chose layer {layer}" + (f", `{agg}`." if agg else ".")]
    else:
        spread = ", ".join(f"{name} in {n} of {folds}" for name, n in per_fold.items())
        out = [f"The outer folds disagree: they chose {len(per_fold)} different cells ({spread}), so the nested figure "
               "belongs to the selection procedure, not to any one cell."]
    out.append(f"The direction cell (the directions file and `tribunal score` use it) is layer {final['layer']}, "
               f"`{final['aggregation']}`: {final['rule']}; {final['folds_won']} of {final['folds']} outer folds chose it.")
    return out


def calibration_sentences(selection: dict) -> list[str]:
    raw, cal = selection["calibration"], selection["calibrated"]["calibration"]
    ref = raw["reference"]
    return [
        f"Calibration of the nested predictions: Brier {raw['brier']:.3f}, ECE {raw['ece']:.3f}; "
        f"{calibration_verdict(raw)}. For reference, always predicting 0.5 scores Brier {ref['brier_constant_half']:.3f}, "
        f"always predicting the base rate {ref['base_rate']:.2f} scores Brier {ref['brier_constant_base_rate']:.3f} "
        "and ECE 0.",
        f"After Platt scaling fit on the training folds only: Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f}; "
        f"{calibration_verdict(cal)}.",
    ]


def claims(cell: dict) -> list[str]:
    """What a reader may and may not claim about one cell, in words."""
    out = []
    lost = [n for n, ok in cell["beats"].items() if not ok and n != "permutation"]
    if not cell["beats"].get("permutation", False):
        out.append(f"not significant against the grouped permutation null (uncorrected p = {cell['permutation_p']:.3f})")
    if "length" in lost:
        out.append("does NOT beat the trace-length baseline (paired AUROC difference CI includes 0): "
                   "trace length alone does about as well")
    if "confidence" in lost:
        out.append("does NOT beat the output-confidence baseline (mean log-prob / entropy)")
    for other in ("majority", "random_direction"):
        if other in lost:
            out.append(f"does not beat the {other.replace('_', ' ')} baseline")
    if not out:
        out.append("beats every baseline (paired CI of the CV ROC-AUC difference above 0) and the permutation null")
    return out


SAVES = "saves tokens with no loss of accuracy"


def early_exit(exit_: dict, signal: bool) -> dict:
    """Whether the probe's exit rule may be claimed to save tokens with no loss of accuracy, and the sentence.

    The claim needs all of: evidence that the chunk probe knows anything (signal: its nested headline is not
    a null), tokens saved with a CI above 0, an accuracy change whose CI stays above -margin, and more tokens
    saved than every baseline rule that keeps accuracy within the margin. Otherwise the sentence says which
    part fails."""
    margin, rules = exit_["margin"], exit_["rules"]
    probe = rules["probe"]
    others = {n: r for n, r in rules.items() if n != "probe"}
    keeps = lambda r: r["accuracy_change_ci"][0] >= -margin  # noqa: E731
    saves = probe["tokens_saved_ci"][0] > 0
    beats = {n: bool(keeps(probe) and saves and (not keeps(r) or probe["tokens_saved"] > r["tokens_saved"]))
             for n, r in others.items()}
    lost = [n.replace("_", " ") for n, ok in beats.items() if not ok]
    figures = (f"accuracy change {probe['accuracy_change']:+.3f} [{probe['accuracy_change_ci'][0]:+.3f}, "
               f"{probe['accuracy_change_ci'][1]:+.3f}], tokens saved {probe['tokens_saved']:.1%} "
               f"[{probe['tokens_saved_ci'][0]:.1%}, {probe['tokens_saved_ci'][1]:.1%}]")
    if not signal:
        text = (f"no early-exit claim: the chunk probe shows no evidence of a signal, so whatever its rule saves is not "
                f"the probe's doing ({figures})")
    elif not keeps(probe):
        text = f"the probe rule may lose more accuracy than the margin {margin:.2f} allows ({figures})"
    elif not saves:
        text = f"the probe rule's token saving is not distinguishable from none ({figures})"
    elif lost:
        text = f"the probe rule keeps accuracy within the margin and saves tokens, but does not beat: {', '.join(lost)}"
    else:
        text = (f"the probe rule {SAVES} beyond the margin {margin:.2f}, and more than every baseline rule "
                f"({figures})")
    claim = bool(signal and keeps(probe) and saves and not lost)
    out = {"probe_beats": beats, "claim": claim, "verdict": text}
    if "trial_answer" in others:
        unshown = ("the chunk probe shows no evidence of a signal" if not signal else
                   f"the probe rule may lose more accuracy than the margin {margin:.2f} allows" if not keeps(probe) else
                   "the probe rule's token saving is not distinguishable from none" if not saves else None)
        out["versus_trial_answer"] = versus_trial_answer(probe, others["trial_answer"], margin,
                                                         bool(signal and beats["trial_answer"]), unshown)
        out["verdict"] = f"{text}. {out['versus_trial_answer']}"
    return out


def versus_trial_answer(probe: dict, trial: dict, margin: float, beats: bool, unshown: str | None = None) -> str:
    """DEER's trial-answer confidence is the strongest training-free rule: say plainly which side wins, and when
    the probe's own rule is not shown to work (`unshown` says why), that the comparison is not won either way."""
    figures = (f"probe {probe['tokens_saved']:.1%} tokens saved, accuracy change {probe['accuracy_change']:+.3f}; "
               f"trial answer {trial['tokens_saved']:.1%}, {trial['accuracy_change']:+.3f}")
    if beats:
        return f"The probe saves more tokens than DEER's trial-answer confidence at the same margin {margin:.2f} ({figures})"
    if unshown:
        return (f"The probe is not shown to beat DEER's trial-answer confidence: {unshown}, whatever it saves "
                f"against DEER's rule ({figures})")
    return f"The probe does not beat DEER's trial-answer confidence at the same margin {margin:.2f} ({figures})"
