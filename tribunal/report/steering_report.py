"""What steering did: each arm of `tribunal steer` against its baseline, pair by pair, and whether the probe
direction's effect is specific to it.

Every arm sampled the same (problem, sample) pairs with the same per-trace seeds: a baseline (alpha = 0), the
residual shifted by alpha * sigma along the probe's direction, the same shift along random unit directions
(controls), and the direction projected out (ablation). So an arm's effect is a paired difference (arm minus
baseline, mean over pairs), and its 95% CI a problem bootstrap: problems are drawn with replacement, all traces
of a drawn problem come with it, and one set of draws serves every arm, so contrasts between arms are paired
too. The direction's effect is called specific only when its CI excludes 0, it lies outside the random
directions' range at the same alpha, and its contrast with their mean has a CI that excludes 0.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from ..chunks import DEFAULT_CUES, cue_pattern
from ..errors import TribunalError
from ..store import format as fmt
from ..store.reader import open_store
from .plots import save, steering_figure

STEERING_JSON = "steering.json"
STEERING_CSV = "steering.csv"
DOSE_FIGURE = "dose_response.png"
KINDS = ("baseline", "direction", "random", "ablation")
# per-trace outcomes; answer_changed is against the baseline's trace of the same pair (the baseline's own is 0)
OUTCOMES = ("accuracy", "mean_tokens", "cues_per_trace", "answer_changed")
CSV_COLUMNS = ("name", "kind", "alpha", "random_index", "traces", *OUTCOMES,
               *(f"{o}_{part}" for o in OUTCOMES for part in ("diff", "diff_low", "diff_high")))

_CHUNK_STARTS = cue_pattern()
_CUE_WORD = re.compile("(?:" + "|".join(re.escape(c) for c in sorted(DEFAULT_CUES, key=len, reverse=True)) + r")\b",
                       re.IGNORECASE)


# -- the core, on plain arrays --------------------------------------------------------------


def cue_count(text: str) -> int:
    """Reflection cues in a generated text: the chunk starts of chunks.cue_pattern() (and the text's start) that
    open with one of DEFAULT_CUES, i.e. a cue opening a sentence or a line, as `probe chunks` cuts at it. A
    paragraph break without a cue is a chunk start but not a cue."""
    starts = {0, *(m.end() for m in _CHUNK_STARTS.finditer(text))}
    return sum(1 for s in starts if _CUE_WORD.match(text, s))


def paired_bootstrap(differences, problems, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over pairs of each row of `differences` (series x pairs) with a 95% percentile problem-bootstrap CI.

    problems: the problem of each pair. Each draw resamples problems with replacement, and every series is
    averaged over the same drawn problems (all of a drawn problem's pairs), so a contrast of two series'
    draws is a paired bootstrap too. Returns value (series,), ci (series, 2) and draws (series, resamples)."""
    diffs = np.atleast_2d(np.asarray(differences, float))
    _, g = np.unique(np.asarray(problems), return_inverse=True)
    n_groups = int(g.max()) + 1
    sums = np.stack([np.bincount(g, row, n_groups) for row in diffs])
    pairs = np.bincount(g, minlength=n_groups).astype(float)
    draws = np.random.default_rng(seed).integers(0, n_groups, (resamples, n_groups))
    counts = np.bincount((draws + n_groups * np.arange(resamples)[:, None]).ravel(),
                         minlength=resamples * n_groups).reshape(resamples, n_groups)
    boot = (sums @ counts.T) / (counts @ pairs)  # every draw holds at least one pair: no division by 0
    return {"value": sums.sum(axis=1) / pairs.sum(), "ci": percentile_ci(boot), "draws": boot}


def percentile_ci(draws) -> np.ndarray:
    """95% percentile intervals of each row of draws: (rows, 2)."""
    return np.percentile(np.atleast_2d(draws), [2.5, 97.5], axis=1).T


def specificity(value: float, ci, draws, random_values, random_draws) -> dict:
    """Is the direction's effect (value, its CI and bootstrap draws) specific to it, against the random
    directions' effects at the same alpha (their values and draws, from the same bootstrap draws)?

    rank_p = (1 + #{r : |effect_r| >= |effect_d|}) / (K + 1): the share of the K + 1 directions whose effect is at
    least as large, so never below 1 / (K + 1). The contrast is effect_d - mean_r effect_r."""
    random_values = [float(v) for v in random_values]
    k = len(random_values)
    out = {"direction": {"value": float(value), "ci": [float(ci[0]), float(ci[1])]}, "random": random_values,
           "controls": k}
    if not k:
        return {**out, "random_min": None, "random_max": None, "rank_p": None, "contrast": None,
                "verdict": "no controls", "reasons": ["no random directions were run at this alpha"]}
    low, high = min(random_values), max(random_values)
    contrast = np.asarray(draws, float) - np.asarray(random_draws, float).mean(axis=0)
    c_lo, c_hi = percentile_ci(contrast)[0]
    reasons = []
    if ci[0] <= 0 <= ci[1]:
        reasons.append("its CI covers 0")
    if low <= value <= high:
        reasons.append("it lies inside the random directions' range")
    if c_lo <= 0 <= c_hi:
        reasons.append("its contrast with the random directions' mean has a CI covering 0")
    return {**out, "random_min": low, "random_max": high,
            "rank_p": (1 + sum(abs(r) >= abs(value) for r in random_values)) / (k + 1),
            "contrast": {"value": float(value - np.mean(random_values)), "ci": [float(c_lo), float(c_hi)]},
            "verdict": "not specific" if reasons else "specific",
            "reasons": reasons or ["its CI excludes 0, it lies outside the random directions' range, and its "
                                   "contrast with their mean has a CI excluding 0"]}


# -- stores -----------------------------------------------------------------------------------


def read_arm(path) -> dict:
    """Per trace of one arm's store: key (problem, sample), correct, generated tokens, cues, predicted answer.
    Table columns, and each shard's text read in one piece."""
    with open_store(path) as store:
        table = store.table
        texts = [s.file[fmt.TRACE_TEXT][: s.committed["text_bytes"]].tobytes() for s in store.shards]
        cues = [cue_count(texts[s][int(a):int(b)].decode("utf-8", "replace"))
                for s, a, b in zip(store.shard_of_trace, table["text_start"], table["text_end"])]
        return {"keys": list(zip(table["problem_id"].tolist(), table["sample_index"].tolist())),
                "correct": (store.labels == "correct").astype(float),
                "tokens": store.generated_lengths.astype(float), "cues": np.array(cues, float),
                "predicted": table["predicted"].copy()}


def aligned(arm: dict, data: dict, baseline_keys: list, baseline_name: str) -> np.ndarray:
    """Indices into an arm's traces in the baseline's key order; a key on one side only is an error."""
    at = {k: i for i, k in enumerate(data["keys"])}
    if len(at) < len(data["keys"]):
        raise TribunalError(f"arm {arm['name']!r} ({arm['store']}) holds {len(data['keys']) - len(at)} (problem, "
                            "sample) pairs twice; give one store per arm, each pair once")
    only_base = [k for k in baseline_keys if k not in at]
    only_arm = sorted(set(at) - set(baseline_keys))
    if only_base or only_arm:
        first = (only_base or only_arm)[0]
        raise TribunalError(
            f"arm {arm['name']!r} ({arm['store']}) and the baseline {baseline_name!r} differ in "
            f"{len(only_base) + len(only_arm)} (problem, sample) keys ({len(only_base)} only in the baseline, "
            f"{len(only_arm)} only in the arm; e.g. {first}): every arm must sample the same pairs; sample the "
            "missing arms again over the baseline's problems and samples")
    return np.array([at[k] for k in baseline_keys], np.int64)


def check_arms(arms: list[dict]) -> dict:
    """The one baseline, and no two arms of the same name or the same (kind, alpha, random index)."""
    unknown = sorted({str(a.get("kind")) for a in arms} - set(KINDS))
    if unknown:
        raise TribunalError(f"arm kind(s) {unknown} unknown; each arm is one of {list(KINDS)}")
    baselines = [a for a in arms if a["kind"] == "baseline"]
    if len(baselines) != 1:
        raise TribunalError(f"{len(baselines)} baseline arms given; steering is measured against exactly one")
    names = [a["name"] for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TribunalError(f"arm name(s) {twice} given twice; each arm needs its own name")
    slots = [(a["kind"], a.get("alpha"), a.get("random_index")) for a in arms]
    same = sorted({str(s) for s in slots if slots.count(s) > 1})
    if same:
        raise TribunalError(f"two arms share (kind, alpha, random index) {same}; give each setting once")
    if any(a["kind"] == "random" and a.get("random_index") is None for a in arms):
        raise TribunalError("a random arm has no random_index; number the random directions")
    if any(a["kind"] in ("direction", "random") and a.get("alpha") is None for a in arms):
        raise TribunalError("a direction or random arm has no alpha; give each shifted arm its alpha")
    return baselines[0]


# -- the report ---------------------------------------------------------------------------------


def steering_report(arms: list[dict], out_dir, bootstrap: int = 2000, seed: int = 0,
                    headline_alpha: float | None = None) -> dict:
    """`tribunal steer`'s report: every arm against the baseline (paired by (problem, sample)), the direction's
    specificity against the random directions at each alpha, into OUT_DIR/steering.json, steering.csv and
    dose_response.png. Returns the JSON's content plus `summary` (the sentences, one a line) and `files`.
    OUT_DIR is created only once every number is computed."""
    base = check_arms(arms)
    data = {a["name"]: read_arm(a["store"]) for a in arms}
    keys = data[base["name"]]["keys"]
    if not keys:
        raise TribunalError(f"the baseline {base['name']!r} ({base['store']}) holds no traces: nothing to compare")
    index = {a["name"]: aligned(a, data[a["name"]], keys, base["name"]) for a in arms}
    problems = np.array([p for p, _ in keys])
    b = data[base["name"]]
    others = [a for a in arms if a is not base]
    rows = []  # per other arm and outcome: the per-pair difference against the baseline
    for arm in others:
        d, i = data[arm["name"]], index[arm["name"]]
        rows += [d["correct"][i] - b["correct"], d["tokens"][i] - b["tokens"], d["cues"][i] - b["cues"],
                 (d["predicted"][i] != b["predicted"]).astype(float)]
    boot = paired_bootstrap(np.array(rows).reshape(-1, len(keys)), problems, bootstrap, seed) if others else None
    effects, draws = {}, {}
    for j, arm in enumerate(others):
        for k, outcome in enumerate(OUTCOMES):
            row = j * len(OUTCOMES) + k
            effects.setdefault(arm["name"], {})[outcome] = {"value": float(boot["value"][row]),
                                                            "ci": [float(x) for x in boot["ci"][row]]}
            draws[(arm["name"], outcome)] = boot["draws"][row]

    arm_rows = []
    for arm in arms:
        d, i = data[arm["name"]], index[arm["name"]]
        changed = effects[arm["name"]]["answer_changed"]["value"] if arm is not base else 0.0
        arm_rows.append({
            "name": arm["name"], "kind": arm["kind"], "alpha": _float(arm.get("alpha")),
            "random_index": None if arm.get("random_index") is None else int(arm["random_index"]),
            "store": str(arm["store"]), "traces": len(keys), "accuracy": float(d["correct"][i].mean()),
            "mean_tokens": float(d["tokens"][i].mean()), "cues_per_trace": float(d["cues"][i].mean()),
            "answer_changed": changed, "effects": effects.get(arm["name"])})

    direction = {float(a["alpha"]): a for a in others if a["kind"] == "direction" and a["alpha"] != 0}
    spec = []
    for alpha in sorted(direction):
        controls = sorted((a for a in others if a["kind"] == "random" and _float(a.get("alpha")) == alpha),
                          key=lambda a: a["random_index"])
        for outcome in OUTCOMES:
            e = effects[direction[alpha]["name"]][outcome]
            s = specificity(e["value"], e["ci"], draws[(direction[alpha]["name"], outcome)],
                            [effects[a["name"]][outcome]["value"] for a in controls],
                            [draws[(a["name"], outcome)] for a in controls])
            spec.append({"alpha": alpha, "outcome": outcome, "direction_arm": direction[alpha]["name"],
                         "random_arms": [a["name"] for a in controls],
                         "random_indices": [int(a["random_index"]) for a in controls], **s})

    result = {
        "baseline": {"name": base["name"], "store": str(base["store"]), "traces": len(keys),
                     "problems": int(len(np.unique(problems)))},
        "bootstrap": {"resamples": bootstrap, "seed": seed, "unit": "problem", "interval": "95% percentile",
                      "draws": "the same resampled problems for every arm and outcome"},
        "outcomes": {"accuracy": "share of traces labelled correct (unparsed counts as not correct)",
                     "mean_tokens": "generated tokens per trace",
                     "cues_per_trace": "reflection cues (chunks.DEFAULT_CUES opening a sentence or line) per trace",
                     "answer_changed": "share of traces whose final answer differs from the baseline's for the pair"},
        "headline_alpha": _headline(direction, headline_alpha),
        "arms": arm_rows, "specificity": spec,
    }
    result["sentences"] = sentences(result)
    result["summary"] = "\n".join(result["sentences"])
    return write_outputs(result, out_dir)


def _headline(direction: dict, asked):
    """The asked alpha (it must have a direction arm); by default the smallest positive one, else the nonzero
    one nearest 0; None without direction arms."""
    if asked is not None:
        if float(asked) not in direction:
            raise TribunalError(f"no direction arm at the headline alpha {asked:g}; the direction arms have alpha "
                                f"{sorted(direction) or 'none'}")
        return float(asked)
    if not direction:
        return None
    positive = [a for a in direction if a > 0]
    return min(positive) if positive else min(direction, key=abs)


def _float(value):
    return None if value is None else float(value)


# -- words --------------------------------------------------------------------------------------

# outcome -> (what changes, unit after the number, scale, digits)
WORDING = {"accuracy": ("accuracy", " percentage points", 100.0, 1),
           "mean_tokens": ("the generated tokens", " tokens per trace", 1.0, 1),
           "cues_per_trace": ("the reflection cues", " cues per trace", 1.0, 2)}


def _signed(value: float, scale: float, digits: int) -> str:
    return f"{value * scale:+.{digits}f}"


def _change(outcome: str, e: dict) -> str:
    """'accuracy by +3.1 percentage points [-1.2, +7.4]' or 'the final answer of 12.5% of traces [...]'."""
    lo, hi = e["ci"]
    if outcome == "answer_changed":
        return f"the final answer of {100 * e['value']:.1f}% of traces [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    what, unit, scale, digits = WORDING[outcome]
    return (f"{what} by {_signed(e['value'], scale, digits)}{unit} "
            f"[{_signed(lo, scale, digits)}, {_signed(hi, scale, digits)}]")


def _random_range(outcome: str, s: dict) -> str:
    k = s["controls"]
    if outcome == "answer_changed":
        span = (f"{100 * s['random_min']:.1f}%" if k == 1 else
                f"{100 * s['random_min']:.1f}% to {100 * s['random_max']:.1f}%")
        return f"the {k} random direction{'s' if k > 1 else ''} change{'s' if k == 1 else ''} it for {span} of traces"
    _, unit, scale, digits = WORDING[outcome]
    lo, hi = _signed(s["random_min"], scale, digits), _signed(s["random_max"], scale, digits)
    if k == 1:
        return f"the 1 random direction changes it by {lo}{unit}"
    return f"the {k} random directions change it by {lo} to {hi}{unit}"


def sentences(result: dict) -> list[str]:
    """Plain lines: the pairs and the baseline's levels; per outcome at the headline alpha, the direction's change
    with its CI, the random directions' range and the verdict with its reason; the ablation arm's changes."""
    base = next(a for a in result["arms"] if a["kind"] == "baseline")
    n_arms = len(result["arms"])
    out = [f"steering report: {result['baseline']['traces']} (problem, sample) pairs of "
           f"{result['baseline']['problems']} problems in each of {n_arms} arm{'s' if n_arms > 1 else ''}; the "
           f"baseline's accuracy is {100 * base['accuracy']:.1f}%, with {base['mean_tokens']:.1f} generated tokens and "
           f"{base['cues_per_trace']:.2f} reflection cues per trace; every change below is the arm minus the "
           "baseline over the same pairs"]
    alpha = result["headline_alpha"]
    if alpha is None:
        out.append("no arm was steered along the direction: there is no effect of it to test against the random "
                   "directions (their arms are in steering.csv)")
    for s in (s for s in result["specificity"] if s["alpha"] == alpha):
        line = (f"steering along the direction at alpha = {alpha:g} changes {_change(s['outcome'], s['direction'])} "
                "(problem-bootstrap 95% CI); ")
        if s["verdict"] == "no controls":
            line += (f"no random directions were run at alpha = {alpha:g}, so whether the effect is specific to "
                     "the direction is untested")
        else:
            verdict = "is specific" if s["verdict"] == "specific" else "is not specific"
            line += (f"{_random_range(s['outcome'], s)}; the effect {verdict} to the direction "
                     f"({'; '.join(s['reasons'])})")
        out.append(line)
    controls = next((s["controls"] for s in result["specificity"] if s["alpha"] == alpha), 0)
    if controls:
        out.append(f"with {controls} random directions, rank p (the share of the {controls + 1} directions whose "
                   f"|effect| is at least the direction's) cannot fall below {1 / (controls + 1):.3f}: 'specific' "
                   "is a screen, not a test at the 5% level")
    for arm in (a for a in result["arms"] if a["kind"] == "ablation"):
        e = arm["effects"]
        out.append(f"ablating the direction (arm {arm['name']!r}: its component projected out) changes "
                   f"{_change('accuracy', e['accuracy'])}, {_change('mean_tokens', e['mean_tokens'])}, "
                   f"{_change('cues_per_trace', e['cues_per_trace'])}, and "
                   f"{_change('answer_changed', e['answer_changed'])} (problem-bootstrap 95% CIs; against the "
                   "baseline only: no random direction was ablated)")
    return out


# -- files --------------------------------------------------------------------------------------


def csv_rows(result: dict) -> list[dict]:
    """One row per arm: its levels and, for every arm but the baseline, each outcome's change with its CI."""
    out = []
    for arm in result["arms"]:
        row = {c: arm.get(c) for c in CSV_COLUMNS[:9]}
        for o in OUTCOMES:
            e = (arm["effects"] or {}).get(o)
            row.update({f"{o}_diff": e and e["value"], f"{o}_diff_low": e and e["ci"][0],
                        f"{o}_diff_high": e and e["ci"][1]})
        out.append(row)
    return out


def write_outputs(result: dict, out_dir) -> dict:
    """The figure is drawn first: a failure in it leaves no half-written folder."""
    out = Path(out_dir)
    files = {"json": str(out / STEERING_JSON), "csv": str(out / STEERING_CSV), "figure": str(out / DOSE_FIGURE)}
    result = {**result, "files": files}
    text = json.dumps(result, indent=1) + "\n"  # refuses numpy values: the JSON holds plain numbers only
    fig = steering_figure(result)
    out.mkdir(parents=True, exist_ok=True)
    save(fig, files["figure"])
    (out / STEERING_JSON).write_text(text)
    with open(out / STEERING_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(result))
    return result
