"""Early exit measured: a run without exit (FULL) against runs of the same settings and seeds with an exit policy
(EXITED), pair by pair, beside what the offline simulation predicts for the same policy on the full run.

Each (problem, sample) of FULL is paired with the same pair of each EXITED store; pairs on one side only are
counted, never dropped silently. Per policy: the share of exited traces whose thinking is a prefix of the full
twin's tokens (the hf engine on deterministic hardware makes them all match), tokens saved (forced answers
included), accuracy change, both with a paired problem bootstrap. The simulation (probes/early_exit.py) stops
after the first chunk of the full trace whose score reaches the policy's threshold and answers with that chunk's
intermediate answer, so for `--exit-answer forced` it predicts the intermediate-answer variant.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import TribunalError
from ..probes import directions as dirs
from ..probes import early_exit as ee
from ..probes.chunk_probe import chunk_logits, load_chunks
from ..store import format as fmt
from ..store.reader import open_store
from .markdown import _pm, exit_measured_lines, policy_label
from .plots import PANEL, _legend_below, _limits, plt, save

REPORT_JSON = "exit_report.json"
REPORT_MD = "exit_report.md"
RESAMPLES = 2000
RULE_COLOURS = ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:red")
# generation settings that change what is sampled: the two runs must agree on each to be paired
SAME_SETTINGS = ("temperature", "top_p", "max_new_tokens", "prompt_template", "chat_template", "engine")
UNSEEDED_NOTE = ("some of these stores record per_trace_seeds: false (vLLM's CPU build with chunked prefill): their "
                 "traces were not each seeded from (seed, problem, sample), so a pair shares its prompt and settings, "
                 "not its randomness; the prefix share measures nothing there, and the paired differences compare "
                 "two independent samples of each pair")
SIMULATION_NOTE = ("the simulation stops after the first chunk of the full trace whose score reaches the threshold "
                   "and answers with that chunk's intermediate answer, counting no forced-answer tokens")


def figure_name(rule: str) -> str:
    return f"exit_report_{rule}.png"


# -- the core, on plain arrays --------------------------------------------------------------


def pair_keys(full_keys, exited_keys) -> dict:
    """Pair (problem_id, sample_index) rows of two traces tables: indices into each, in FULL's order, and the
    pairs on one side only."""
    full_at = {tuple(map(int, k)): i for i, k in enumerate(full_keys)}
    exited_at = {tuple(map(int, k)): i for i, k in enumerate(exited_keys)}
    both = [k for k in full_at if k in exited_at]
    return {"full": np.array([full_at[k] for k in both], np.int64),
            "exited": np.array([exited_at[k] for k in both], np.int64),
            "only_full": sorted(set(full_at) - set(exited_at)), "only_exited": sorted(set(exited_at) - set(full_at))}


def is_prefix(full_ids, exited_ids, prompt_length: int, thinking_tokens: int, exited: bool) -> bool:
    """An exited trace matches when its prompt and thinking equal the full twin's first tokens; a trace that
    never exited matches only when it is the full trace itself."""
    n = prompt_length + int(thinking_tokens)
    if not exited:
        return len(exited_ids) == len(full_ids) and np.array_equal(exited_ids, full_ids)
    return n <= len(full_ids) and np.array_equal(exited_ids[:n], full_ids[:n])


def problem_bootstrap(groups, full_tokens, exited_tokens, full_correct, exited_correct,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Point values and 95% percentile CIs of tokens saved, accuracy change and both accuracies, resampling
    problems with replacement (a problem's pairs go together, both runs' traces of a pair together)."""
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(g.max()) + 1
    sums = np.stack([np.bincount(g, np.asarray(v, float), n_groups)
                     for v in (full_tokens, exited_tokens, full_correct, exited_correct, np.ones(len(g)))])

    def stats(t):  # t: (5, ...) sums over the drawn problems
        return {"tokens_saved": 1 - t[1] / t[0], "accuracy_change": (t[3] - t[2]) / t[4],
                "full_accuracy": t[2] / t[4], "exited_accuracy": t[3] / t[4]}

    draws = np.random.default_rng(seed).integers(0, n_groups, (resamples, n_groups))
    counts = np.bincount((draws + n_groups * np.arange(resamples)[:, None]).ravel(),
                         minlength=resamples * n_groups).reshape(resamples, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):  # a draw with no full tokens has no ratio
        boot = stats(sums @ counts.T)
    point = stats(sums.sum(axis=1))
    out = {}
    for name, value in point.items():
        lo, hi = np.nanpercentile(boot[name], [2.5, 97.5])
        out[name] = float(value)
        out[f"{name}_ci"] = [float(lo), float(hi)]
    return out


def measured(groups, full_tokens, exited_tokens, full_correct, exited_correct, matched, exited_mask, rules,
             forced_tokens, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The measured figures of one policy over its paired traces (arrays aligned pair by pair)."""
    exited_mask, matched = np.asarray(exited_mask, bool), np.asarray(matched, bool)
    n = len(exited_mask)
    return {
        **problem_bootstrap(groups, full_tokens, exited_tokens, full_correct, exited_correct, resamples, seed),
        "pairs": n, "problems": int(len(np.unique(groups))), "exited": int(exited_mask.sum()),
        "exits_by_rule": dict(sorted(Counter(r for r, e in zip(rules, exited_mask) if e).items())),
        "full_tokens": int(np.sum(full_tokens)), "exited_tokens": int(np.sum(exited_tokens)),
        "forced_tokens": int(np.sum(forced_tokens)),
        "prefix": {"matched": int(matched.sum()), "share": float(matched.mean()) if n else float("nan"),
                   "exited_matched": int(matched[exited_mask].sum()), "exited": int(exited_mask.sum()),
                   "not_exited_identical": int(matched[~exited_mask].sum()), "not_exited": int((~exited_mask).sum())},
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "problem", "interval": "95% percentile"},
    }


def simulated(case: ee.ExitCase, score, tau: float) -> dict:
    """The offline simulation of one threshold rule on the full traces, with early_exit's interval summary."""
    correct, tokens = case.threshold_rule(score, tau)
    out = ee.interval_summary(correct, tokens, case.trace_tokens, case.trace_correct, case.trace_group)
    out["exited"] = int(np.sum(case.first_chunk_at_or_above(score, tau) >= 0))
    return {**out, "answer": "intermediate", "traces": int(len(case.trace_correct))}


# -- stores -----------------------------------------------------------------------------------


def settings_of(store) -> dict:
    """What must agree for two runs' traces to be twins: model, data, seed and the sampling settings."""
    gen = store.attrs.get("generation_settings") or {}
    out = {"model": store.model_id, "model_revision": store.attrs.get("model_revision"),
           "dataset": store.attrs.get("dataset_id"), "split": store.attrs.get("dataset_split"),
           "seed": store.attrs.get("seed")}
    out.update({k: gen.get(k, "hf" if k == "engine" else None) for k in SAME_SETTINGS})
    return out


def _seeded(store) -> bool:
    """Whether each trace was sampled from its own seed (false: vLLM's CPU build with chunked prefill)."""
    return (store.attrs.get("generation_settings") or {}).get("per_trace_seeds", True) is not False


def setting_differences(full: dict, exited: dict) -> list[str]:
    return [f"{k}: {full[k]!r} in FULL, {exited.get(k)!r} here" for k in full if full[k] != exited.get(k)]


def exit_policy(store, name: str) -> dict:
    policy = (store.attrs.get("generation_settings") or {}).get("exit_policy")
    if not policy:
        raise TribunalError(f"{name} was sampled without an exit policy; give a store of `tribunal generate "
                            "--exit-policy PROBES_DIR` as EXITED")
    if getattr(store, "exit_table", None) is None:
        raise TribunalError(f"{name} has an exit policy but no exit records (/traces/exit); was it written by an "
                            "older tribunal? Sample it again with this one")
    return policy


def exit_records(store) -> dict:
    """Per trace of the store: exited (bool), rule name, thinking and forced tokens."""
    table = store.exit_table
    rule = np.array(fmt.EXIT_RULES, dtype=object)[table["rule"].astype(int)]
    return {"exited": table["exit_chunk"] >= 0, "rule": rule, "thinking": table["thinking_tokens"].astype(np.int64),
            "forced": table["forced_tokens"].astype(np.int64)}


class _TokenIds:
    """Every trace's token ids, read one shard at a time (one read per shard, not per trace)."""

    def __init__(self, store):
        self.store, self._cache = store, {}

    def __call__(self, index: int) -> np.ndarray:
        s = int(self.store.shard_of_trace[index])
        if s not in self._cache:
            self._cache[s] = self.store.shards[s].token_array("token_id")
        row = self.store.table[index]
        return self._cache[s][int(row["token_start"]) : int(row["token_end"])]


def _keys(store) -> np.ndarray:
    return np.column_stack([store.table["problem_id"], store.table["sample_index"]])


class _Simulation:
    """The full run's chunks, loaded once, and each rule's per-chunk scores, computed once per probes folder."""

    def __init__(self, store, decode_pieces, pattern=None):
        self.store, self.data = store, load_chunks(store, decode_pieces, pattern)
        d = self.data
        position = {int(t): j for j, t in enumerate(d.traces)}
        self.position = position
        self.case = ee.ExitCase(chunk_trace=np.array([position[int(t)] for t in d.trace]),
                                chunk_tokens=d.token_end + 1.0, chunk_correct=d.y, trace_correct=d.trace_correct,
                                trace_tokens=d.trace_tokens, trace_group=d.trace_problem)
        self._probe = {}

    def score(self, rule: str, probes) -> np.ndarray:
        if rule == "confidence":
            return self.data.confidence
        if rule != "probe":
            raise TribunalError(f"exit rule {rule!r} is not one the simulation knows (probe, confidence)")
        key = str(probes)
        if key not in self._probe:
            self._probe[key] = chunk_probabilities(dirs.load(probes), self.store, self.data)
        return self._probe[key]

    def predict(self, full_indices, rule: str, probes, tau: float) -> dict:
        """The simulation on the paired full traces only (the measured figures' traces)."""
        keep = np.array(sorted(self.position[int(i)] for i in full_indices if int(i) in self.position), np.int64)
        chunks = np.isin(self.case.chunk_trace, keep)
        return simulated(self.case.subset(keep), self.score(rule, probes)[chunks], tau)


def chunk_probabilities(doc: dict, store, data) -> np.ndarray:
    """The saved chunk direction's probability at each chunk end of FULL."""
    return 1 / (1 + np.exp(-chunk_logits(doc, store, data)))


# -- the report ---------------------------------------------------------------------------------


def exit_report(full, exited: list, out_dir, decode_pieces, probes=None, pattern=None,
                resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """`tribunal exit-report`: FULL (a run without exit) against each EXITED store (one policy each), measured
    and simulated, into OUT_DIR/exit_report.json, exit_report.md and one plot per rule. Returns the JSON's
    content plus `summary` (the terminal text).

    decode_pieces: the model's per-token decoder (traces.models.piece_decoder) that finds FULL's chunk ends;
    probes: the probes folder to score chunks with (default: the one each policy names)."""
    if not exited:
        raise TribunalError("give at least one EXITED store (a run of the same settings with --exit-policy)")
    with open_store(full) as full_store:
        if (full_store.attrs.get("generation_settings") or {}).get("exit_policy"):
            raise TribunalError(f"FULL ({full}) was sampled with an exit policy; give the run without one first")
        full_settings = settings_of(full_store)
        seeded = [_seeded(full_store)]
        full_ids, full_keys = _TokenIds(full_store), _keys(full_store)
        full_correct = full_store.labels == "correct"
        full_gen = full_store.generated_lengths
        prompt = full_store.table["prompt_length"].astype(np.int64)
        problems = full_store.table["problem_id"].astype(np.int64)
        simulation = None
        policies = []
        for spec in exited:
            with open_store(spec) as store:
                diffs = setting_differences(full_settings, settings_of(store))
                if diffs:
                    raise TribunalError(f"EXITED {spec} is not a twin of FULL {full} ({'; '.join(diffs)}): its traces "
                                        "cannot be paired; sample it with FULL's settings and --exit-policy")
                policy = exit_policy(store, f"EXITED {spec}")
                seeded.append(_seeded(store))
                pairs = pair_keys(full_keys, _keys(store))
                if not len(pairs["full"]):
                    raise TribunalError(f"EXITED {spec} shares no (problem, sample) with FULL {full}: nothing to pair")
                fi, xi = pairs["full"], pairs["exited"]
                rec = exit_records(store)
                ids = _TokenIds(store)
                matched = [is_prefix(full_ids(a), ids(b), int(prompt[a]), rec["thinking"][b], rec["exited"][b])
                           for a, b in zip(fi, xi)]
                m = measured(problems[fi], full_gen[fi], store.generated_lengths[xi], full_correct[fi],
                             (store.labels == "correct")[xi], matched, rec["exited"][xi], rec["rule"][xi],
                             rec["forced"][xi], resamples, seed)
                tau = policy.get("threshold")  # None: no threshold saves tokens, the rule never fires
                tau = math.inf if tau is None else float(tau)
                if simulation is None:
                    simulation = _Simulation(full_store, decode_pieces, pattern)
                rule = policy.get("rule")
                sim = simulation.predict(fi, rule, probes or policy.get("probes"), tau)
                policies.append({"store": str(spec), "rule": rule, "threshold": None if math.isinf(tau) else tau,
                                 "threshold_spec": policy.get("threshold_spec"), "answer": policy.get("answer"),
                                 "probes": str(probes or policy.get("probes")), "only_in_full": len(pairs["only_full"]),
                                 "only_in_exited": len(pairs["only_exited"]), "measured": m, "simulated": sim,
                                 "figure": figure_name(rule)})
        doc = {"full": {"store": str(full), "traces": int(full_store.n_traces), **full_settings},
               "simulation_note": SIMULATION_NOTE, "policies": policies}
        if not all(seeded):
            doc["pairing_note"] = UNSEEDED_NOTE
    return write_outputs(doc, out_dir)


def write_outputs(doc: dict, out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rule in sorted({p["rule"] for p in doc["policies"]}):
        save(exit_figure(doc, rule), out / figure_name(rule))
    (out / REPORT_JSON).write_text(json.dumps(doc, indent=1, default=_json_value) + "\n")
    (out / REPORT_MD).write_text("\n".join(["# Early exit, measured", "", *exit_measured_lines(doc)]) + "\n")
    return {**doc, "summary": summary_text(doc)}


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def exit_figure(doc: dict, rule: str):
    """Tokens saved (x) against accuracy change (y), 95% CIs both ways: each policy of one rule measured (filled)
    and simulated (hollow, same colour), a thin line joining the two."""
    fig, ax = plt.subplots(figsize=(PANEL[0] * 1.3, PANEL[1] * 1.3), layout="constrained")
    xs, ys = [0.0], [0.0]
    for k, p in enumerate(x for x in doc["policies"] if x["rule"] == rule):
        colour = RULE_COLOURS[k % len(RULE_COLOURS)]
        points = []
        for kind, r, filled in (("measured", p["measured"], True), ("simulated", p["simulated"], False)):
            x, y = r["tokens_saved"], r["accuracy_change"]
            (xlo, xhi), (ylo, yhi) = r["tokens_saved_ci"], r["accuracy_change_ci"]
            bars = ax.errorbar([x], [y], xerr=[[max(x - xlo, 0)], [max(xhi - x, 0)]],
                               yerr=[[max(y - ylo, 0)], [max(yhi - y, 0)]], fmt="o" if filled else "s",
                               ms=7 if filled else 9, mfc=colour if filled else "none", mec=colour, color=colour,
                               capsize=3 if filled else 5, lw=1.8 if filled else 0.9,
                               label=f"{policy_label(p)}: {kind}")
            if not filled:  # dashed bars: a simulated CI on top of a measured one stays visible
                for line in bars[2]:
                    line.set_linestyle("--")
            points.append((x, y))
            xs += [xlo, xhi]
            ys += [ylo, yhi]
        ax.plot(*zip(*points), color=colour, lw=0.6, ls=":")
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlim(*_limits(xs, include=(), pad=0.08))
    ax.set_ylim(*_limits(ys, include=(-0.02, 0.02), pad=0.08))
    ax.set_xlabel("generated tokens saved (fraction; forced answers count as spent)")
    ax.set_ylabel("accuracy change against the full run")
    ax.set_title(f"early exit by the {rule} rule: measured (filled, solid CIs) and simulated (hollow, dashed CIs)\n"
                 "95% CIs over problems",
                 fontsize=8)
    _legend_below(ax, ncol=1)
    return fig


def summary_text(doc: dict) -> str:
    out = [f"exit report: FULL {doc['full']['store']} ({doc['full']['traces']} traces)"]
    for p in doc["policies"]:
        m, s = p["measured"], p["simulated"]
        out.append(f"  {policy_label(p)}: {m['pairs']} pairs, {m['exited']} exited, prefix of the full twin "
                   f"{m['prefix']['matched']}/{m['pairs']}; "
                   f"tokens saved {_pm(m['tokens_saved'], m['tokens_saved_ci'], True)}"
                   f" (simulated {_pm(s['tokens_saved'], s['tokens_saved_ci'], True)}); accuracy change "
                   f"{_pm(m['accuracy_change'], m['accuracy_change_ci'], signed=True)} (simulated "
                   f"{_pm(s['accuracy_change'], s['accuracy_change_ci'], signed=True)})"
                   + (f"; unpaired: {p['only_in_full']} only in FULL, {p['only_in_exited']} only here"
                      if p["only_in_full"] or p["only_in_exited"] else ""))
    if doc.get("pairing_note"):
        out.append(f"  note: {doc['pairing_note']}")
    return "\n".join(out)
