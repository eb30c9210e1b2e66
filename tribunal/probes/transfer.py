"""Transfer: does a probe fit on some stores hold on others (another dataset, prompt template, temperature)?

Every probe kind is fit on all of the training stores and scored on the test stores: each trajectory cell
(layer x aggregation), the token probe's LDA and mass-mean directions (on every test token, and on each test
trace's mean score), and the chunk probe per layer. Beside each transferred figure: the in-distribution one (the
probe's own evaluation on the training stores: problem-grouped CV with refitting's variance for cells and chunk
layers, the token probe's held-out split) and the baselines, refit on the training stores and scored on the
test ones. A transferred ROC-AUC is one fitted model's on problems it never saw, so its 95% CI is the held-out
influence-curve interval with a problem's traces summed into one term (evaluation.heldout_metrics): given the fit,
it is what resampling test problems measures; the variance of refitting on other training data is not in it.

Stores of another model, revision, layer set, width or dtype are refused (a direction means nothing in another
space); another dataset, prompt template or temperature is what transfer is for, and the result names it.
Training and test stores that share a (dataset, problem) are refused: a probe could recognise the problem instead
of the outcome, the leak that problem-grouped folds exist to prevent.
"""

from __future__ import annotations

import csv
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..errors import TribunalError
from ..store.format import parse_json_text
from ..store.reader import Store, open_store
from . import evaluation as ev
from . import search
from .config import ProbeConfig
from .search import make_probe
from .tokens import _evaluate_directions, _fit_directions, block_bytes_for, fit_token_probe, split_problems
from .trajectory import load_trajectory_data
from .verdict import fmt_ci

SAME = ("model_id", "model_revision", "layers", "d_model", "dtype")  # must match: one activation space
NAMED = ("dataset", "split", "subset", "prompt_template", "chat_template", "temperature", "top_p", "max_new_tokens")
GENERATION_NAMED = NAMED[3:]  # of generation_settings; dataset, split and subset (merge's) are attributes of their own
JSON_FILE, CSV_FILE = "transfer.json", "transfer.csv"


def transfer(train, test, out_dir, decode_pieces=None, layers=None, token_layer: int | None = None,
             progress: bool = False, **options) -> dict:
    """Fit every probe kind on the `train` stores, score it on the `test` stores; write transfer.json and
    transfer.csv into out_dir (created only once every number is in). train, test: lists of store specs (a
    file, a glob or a run folder each). decode_pieces: the stores' tokenizer as chunk_probe.load_chunks takes
    it; None leaves the chunk probe out. options: ProbeConfig fields (folds, seed, permutations, memory,
    aggregations, last_k, C, test_fraction)."""
    cfg = ProbeConfig(**options).validate()
    train, test = _specs(train, "--train"), _specs(test, "--test")
    with ExitStack() as stack:
        sides = [_open_side(specs, stack) for specs in (train, test)]
        for store, _ in sides:
            cfg.check_store(store)
        _check_same_space(sides)
        (tr_store, tr_files), (te_store, te_files) = sides
        keys = [_problem_keys(s) for s, _ in sides]
        _check_no_shared_problems(keys, tr_files, te_files)
        codes = _group_codes(keys)
        settings = [_settings(s) for s, _ in sides]
        result = {"train": {"stores": tr_files, **_describe(settings[0])},
                  "test": {"stores": te_files, **_describe(settings[1])},
                  "differences": _differences(*settings), "intervals": INTERVALS, "notes": [],
                  "settings": {"layers": layers, "token_layer": token_layer,
                               **{f.name: ProbeConfig.as_argument(getattr(cfg, f.name))
                                  for f in cfg.cli_fields("trajectory", "tokens")}}}
        result["trajectory"], test_side = _trajectory(tr_store, te_store, codes, layers, cfg, progress)
        result["token"] = _token(tr_store, te_store, codes, token_layer, cfg, test_side, progress)
        if decode_pieces is None:
            result["chunk"] = None
            result["notes"].append("chunk probe left out: no tokenizer to find chunk ends (decode_pieces)")
        else:
            result["chunk"] = _chunk(tr_store, te_store, codes, decode_pieces, cfg, result["notes"], progress)
    result["rows"] = rows(result)
    result["summary"] = summarize(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_FILE).write_text(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=1,
                                            default=_plain))
    write_csv(result["rows"], out / CSV_FILE)
    return result


INTERVALS = ("in distribution: the probe's own evaluation on the training stores (cells and chunk layers: mean over "
             "problem-grouped folds, CI with refitting's variance; token probe: its held-out split of the training "
             "problems); transferred: the probe fit on all training traces, scored on every test trace, 95% CI from "
             "the held-out influence curve with each test problem one unit (given the fit)")


# -- the stores ------------------------------------------------------------------------------------


def _specs(specs, flag: str) -> list:
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs or [])
    if not specs:
        raise TribunalError(f"{flag}: give at least one store (a file, a glob or a run folder)")
    return specs


def _open_side(specs, stack: ExitStack) -> tuple[Store, list[str]]:
    """One side's stores read as one: each spec is opened (and checked) as a store of its own, then their files
    are read together; shards of different datasets may share problem ids, the groups keep them apart."""
    stores = [stack.enter_context(open_store(spec)) for spec in specs]
    shards = [shard for store in stores for shard in store.shards]
    files = [str(shard.path) for shard in shards]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise TribunalError(f"{twice[0]} is given twice on one side: give each store once")
    if len(stores) == 1:
        return stores[0], files
    _check_same_space([(s, [str(s.shards[0].path)]) for s in stores])
    return Store(shards, allow_overlap=True), files


def _space(store: Store) -> dict:
    ident = store.identity
    return {"model_id": ident.model_id, "model_revision": ident.model_revision, "layers": list(ident.layers),
            "d_model": ident.d_model, "dtype": ident.dtype}


def _check_same_space(sides) -> None:
    """Refuse, naming what differs, a store of another model, revision, layer set, width or dtype."""
    (first, first_files), rest = sides[0], sides[1:]
    want = _space(first)
    for store, files in rest:
        have = _space(store)
        diffs = [f"{name} {want[name]!r} vs {have[name]!r}" for name in SAME if want[name] != have[name]
                 and not (name == "model_id" and first.identity.same_local_model(store.identity))]
        if diffs:
            raise TribunalError(f"{files[0]} is not in the activation space of {first_files[0]} ({'; '.join(diffs)}): "
                                "a probe transfers only between stores of one model, layer set, width and dtype; "
                                "recapture with `tribunal capture --layers` or compare stores of one model")


def _settings(store: Store) -> list[dict]:
    """Per shard: the settings a transfer report names (dataset, split, prompt template, temperature, ...)."""
    out = []
    for shard in store.shards:
        attrs = shard.attrs
        gen = parse_json_text(attrs.get("generation_settings", {})) or {}
        gen = gen if isinstance(gen, dict) else {}
        out.append({"dataset": attrs.get("dataset_id"), "split": attrs.get("dataset_split"), "subset": attrs.get("subset"),
                    **{k: gen.get(k) for k in GENERATION_NAMED}})
    return out


def _describe(settings: list[dict]) -> dict:
    return {name: sorted({json.dumps(s[name]) for s in settings}) for name in NAMED}


def _differences(train: list[dict], test: list[dict]) -> dict:
    """{setting: {"train": values, "test": values}} for each named setting whose values differ between sides."""
    out = {}
    for name in NAMED:
        a, b = ({_text(s[name]) for s in side} for side in (train, test))
        if a != b:
            out[name] = {"train": sorted(a), "test": sorted(b)}
    return out


def _text(value) -> str:
    return "none" if value is None else str(value)


def _problem_keys(store: Store) -> np.ndarray:
    """Per trace, '<dataset>|<split>|<problem_id>': what identifies a problem across stores (a local dataset file by
    its content hash, as generate's resume check does)."""
    names = []
    for shard in store.shards:
        attrs = shard.attrs
        ident = parse_json_text(attrs.get("resume_identity", {})) or {}
        dataset = (ident.get("dataset") if isinstance(ident, dict) else None) or attrs.get("dataset_id")
        names.append(f"{dataset}|{attrs.get('dataset_split')}|")
    owner = np.asarray(store.shard_of_trace)
    return np.array([names[s] + str(int(p)) for s, p in zip(owner, store.table["problem_id"])], dtype=object)


def _check_no_shared_problems(keys, train_files, test_files) -> None:
    shared = sorted(set(keys[0]) & set(keys[1]))
    if shared:
        dataset, split, problem = shared[0].split("|")
        raise TribunalError(
            f"{len(shared)} of {len(set(keys[1]))} test problems are also in the training stores (e.g. problem "
            f"{problem} of {dataset} {split}, in {train_files[0]} and {test_files[0]}): a probe could recognise the "
            "problem rather than the outcome; sample the two sides from disjoint problems (e.g. generate --shard 0/2 "
            "and --shard 1/2, or another split)")


def _group_codes(keys) -> list[np.ndarray]:
    """Per side, an integer group per trace: one per (dataset, problem), distinct across datasets."""
    _, codes = np.unique(np.concatenate(keys), return_inverse=True)
    return [codes[: len(keys[0])], codes[len(keys[0]):]]


# -- scoring -----------------------------------------------------------------------------------------


def _heldout_auroc(y, score, groups) -> dict:
    return ev.heldout_metrics(np.asarray(y), np.asarray(score, float), np.asarray(groups))["auroc"]


def _fit_and_score(X_train, y_train, X_test, C: float):
    model = make_probe(C).fit(X_train, y_train)
    return model, model.predict_proba(X_test)[:, 1]


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _probe_direction(model) -> np.ndarray:
    scaler, logistic = model[0], model[-1]
    return logistic.coef_[0] / scaler.scale_


def _transfer_set(X_tr, y_tr, g_tr, X_te, y_te, g_te, d: search.Design, key, C: float) -> dict:
    """One candidate: in-distribution (grouped CV on the training side), transferred (fit on all of it, scored on
    the test side), and the cosine between the directions fit on each side (do the two sides agree on it?)."""
    cand = search.score_candidate(d, key, X_tr, C)
    model, prob = _fit_and_score(X_tr, y_tr, X_te, C)
    other = make_probe(C).fit(X_te, y_te) if len(np.unique(y_te)) == 2 else None
    return {"in_distribution": cand.metrics["auroc"], "transferred": _heldout_auroc(y_te, prob, g_te),
            "cosine_train_test": None if other is None else _cosine(_probe_direction(model), _probe_direction(other))}


def _baselines(train_features: dict, y_tr, g_tr, test_features: dict, y_te, g_te, d: search.Design) -> dict:
    """Each baseline in distribution (on the same grouped folds) and refit on the training side, scored on the test."""
    out = {}
    for name, X_tr in train_features.items():
        if name not in test_features:
            continue
        oof = search.cv_predict(make_probe, X_tr, y_tr, d.outer)
        _, prob = _fit_and_score(X_tr, y_tr, test_features[name], 1.0)
        out[name] = {"in_distribution": ev.cv_metrics(y_tr, oof, d.outer, g_tr)["auroc"],
                     "transferred": _heldout_auroc(y_te, prob, g_te)}
    return out


def _both_classes(y, side: str, what: str) -> None:
    if len(np.unique(y)) < 2:
        raise TribunalError(f"the {side} stores have {what} of one class only: transfer needs correct and "
                            "incorrect on both sides")


def _trajectory(tr_store, te_store, codes, layers, cfg, progress) -> dict:
    data = [load_trajectory_data(s, layers, cfg.aggregations, cfg.last_k, cfg.block_bytes, progress)
            for s in (tr_store, te_store)]
    tr, te = data
    for side, dt in zip(("training", "test"), data):
        _both_classes(dt.y, side, "graded traces")
    g_tr, g_te = codes[0][tr.trace_index], codes[1][te.trace_index]
    d = search.design(tr.y, g_tr, cfg.folds, cfg.seed, cfg.permutations)
    plain = [{"length": np.log1p(dt.lengths)[:, None],
              **({"confidence": dt.confidence} if dt.confidence is not None else {})} for dt in data]
    common = _baselines(plain[0], tr.y, g_tr, plain[1], te.y, g_te, d)
    rng = np.random.default_rng(cfg.seed)
    cells = []
    for key in sorted(tr.features):
        layer, agg = key
        X_tr, X_te = tr.features[key], te.features[key]
        r = rng.standard_normal(X_tr.shape[1])
        r /= np.linalg.norm(r)
        cell = _transfer_set(X_tr, tr.y, g_tr, X_te, te.y, g_te, d, key, cfg.C)
        random = _baselines({"random_direction": (X_tr @ r)[:, None]}, tr.y, g_tr,
                            {"random_direction": (X_te @ r)[:, None]}, te.y, g_te, d)
        cells.append({"kind": "trajectory", "layer": int(layer), "aggregation": agg, **cell,
                      "baselines": {**common, **random}})
    test_side = {"mean": {int(k[0]): v for k, v in te.features.items() if k[1] == "mean"}, "y": te.y,
                 "groups": g_te, "index": te.trace_index}
    return {"cells": cells, "train_traces": int(len(tr.y)), "test_traces": int(len(te.y)),
            "train_problems": int(len(np.unique(g_tr))), "test_problems": int(len(np.unique(g_te))),
            "folds": cfg.folds, "permutations": cfg.permutations}, test_side


def _token(tr_store, te_store, codes, layer, cfg, test_side, progress) -> dict:
    """The token probe: in distribution, `probe tokens`' own held-out split of the training problems; transferred,
    both directions fit on every graded training token and scored on every graded test token (overall and by
    relative position) and on each test trace's mean score (the mean aggregate's projection, by linearity)."""
    layer = tr_store.layers[len(tr_store.layers) // 2] if layer is None else tr_store.check_layers([layer])[0]
    inside = fit_token_probe(tr_store, layer, cfg.memory_bytes, cfg.test_fraction, cfg.seed, progress=progress)
    block = block_bytes_for(cfg.memory_bytes, tr_store.d_model, 2 if tr_store.dtype != "float32" else 4)
    sides = []
    for store in (tr_store, te_store):
        labels = store.labels
        sides.append((np.isin(labels, ["correct", "incorrect"]), (labels == "correct").astype(int)))
    (tr_graded, tr_y), (te_graded, te_y) = sides
    directions, midpoint, train_tokens = _fit_directions(tr_store, layer, block, tr_graded, tr_y, 1e-2, progress)
    scored = _evaluate_directions(te_store, layer, block, te_graded, te_y, codes[1], directions, midpoint, progress)
    # the per-trace mean score of the held-out training traces, in distribution
    tr_groups = tr_store.table["problem_id"].astype(np.int64)
    held = np.flatnonzero(tr_graded)[split_problems(tr_groups[tr_graded], cfg.test_fraction, cfg.seed)]
    tr_mean = tr_store.aggregate(layer, ("mean",), cfg.last_k, cfg.block_bytes)["mean"]
    te_mean = test_side["mean"].get(layer)
    if te_mean is None:
        te_mean = te_store.aggregate(layer, ("mean",), cfg.last_k, cfg.block_bytes)["mean"][test_side["index"]]
    out = {"layer": int(layer), "train_tokens": train_tokens, "test_tokens": scored["test_tokens"], "directions": {}}
    for name, u in directions.items():
        inside_u = np.asarray(inside["directions"][name]["direction"])
        inside_mid = float(np.asarray(inside["midpoint"]) @ inside_u)
        out["directions"][name] = {
            "tokens": {"in_distribution": inside["directions"][name]["auroc"],
                       "transferred": scored["directions"][name]["auroc"]},
            "trace_mean": {"in_distribution": _heldout_auroc(tr_y[held], tr_mean[held] @ inside_u - inside_mid,
                                                             codes[0][held]),
                           "transferred": _heldout_auroc(test_side["y"], te_mean @ u - float(midpoint @ u),
                                                         test_side["groups"])},
            "auroc_by_position": scored["directions"][name]["auroc_by_position"],
            "direction": u.tolist(), "midpoint_projection": float(midpoint @ u)}
    return out


def _chunk(tr_store, te_store, codes, decode_pieces, cfg, notes, progress) -> dict | None:
    from .chunk_probe import chunk_features, load_chunks

    data = []
    for side, store in (("training", tr_store), ("test", te_store)):
        try:
            data.append(load_chunks(store, decode_pieces, progress=progress))
        except TribunalError as exc:
            notes.append(f"chunk probe left out: the {side} stores: {exc}")
            return None
        if len(np.unique(data[-1].y)) < 2:
            notes.append(f"chunk probe left out: the {side} stores' intermediate answers are of one class only")
            return None
    tr, te = data
    g_tr, g_te = codes[0][tr.trace], codes[1][te.trace]
    d = search.design(tr.y, g_tr, cfg.folds, cfg.seed, cfg.permutations)
    base = _baselines(tr.baselines, tr.y, g_tr, te.baselines, te.y, g_te, d)
    layers = []
    for layer in tr_store.layers:
        X_tr = chunk_features(tr_store, layer, tr, cfg.block_bytes)
        X_te = chunk_features(te_store, layer, te, cfg.block_bytes)
        layers.append({"kind": "chunk", "layer": int(layer), "aggregation": "chunk_end",
                       **_transfer_set(X_tr, tr.y, g_tr, X_te, te.y, g_te, d, int(layer), cfg.C), "baselines": base})
    return {"layers": layers, "train_chunks": int(len(tr.y)), "test_chunks": int(len(te.y))}


# -- what is written -----------------------------------------------------------------------------------


def rows(result: dict) -> list[dict]:
    """One row per transferred candidate: kind, layer, aggregation, in-distribution and transferred AUROC with CIs,
    each baseline's transferred AUROC."""
    out = []
    for cell in result["trajectory"]["cells"]:
        out.append(_row(cell))
    token = result["token"]
    for name, d in token["directions"].items():
        for unit in ("tokens", "trace_mean"):
            out.append(_row({"kind": "token", "layer": token["layer"], "aggregation": f"{name}:{unit}", **d[unit],
                             "baselines": {}}))
    for layer in (result["chunk"] or {}).get("layers", []):
        out.append(_row(layer))
    return out


def _row(c: dict) -> dict:
    return {"kind": c["kind"], "layer": c["layer"], "aggregation": c["aggregation"],
            "in_distribution": c["in_distribution"], "transferred": c["transferred"],
            "cosine_train_test": c.get("cosine_train_test"),
            "baselines": {n: b["transferred"] for n, b in c.get("baselines", {}).items()}}


def write_csv(table: list[dict], path) -> None:
    names = sorted({n for r in table for n in r["baselines"]})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "layer", "aggregation", "in_distribution_auroc", "in_distribution_ci_low",
                    "in_distribution_ci_high", "transferred_auroc", "transferred_ci_low", "transferred_ci_high",
                    "cosine_train_test"] + [f"baseline_{n}_transferred_auroc" for n in names])
        for r in table:
            a, b = r["in_distribution"], r["transferred"]
            w.writerow([r["kind"], r["layer"], r["aggregation"], *_three(a), *_three(b),
                        "" if r["cosine_train_test"] is None else f"{r['cosine_train_test']:.4f}"]
                       + [f"{r['baselines'][n]['value']:.4f}" if n in r["baselines"] else "" for n in names])


def _three(m: dict) -> list[str]:
    return [f"{m['value']:.4f}", f"{m['ci'][0]:.4f}", f"{m['ci'][1]:.4f}"]


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


# -- the words -------------------------------------------------------------------------------------------


def _side_name(side: dict) -> str:
    files = [Path(f).name for f in side["stores"]]
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    datasets = ", ".join(json.loads(v) or "?" for v in side["dataset"])
    return f"{shown} ({datasets})"


def fate(transferred: dict) -> str:
    """'keeps', 'falls to chance' (the CI covers 0.5) or 'reverses' (the CI lies below 0.5)."""
    lo, hi = transferred["ci"]
    return "falls to chance" if lo <= 0.5 <= hi else "keeps" if lo > 0.5 else "reverses"


def sentence(what: str, c: dict, train: str, test: str) -> str:
    """'fit on X, the probe at layer L keeps AUROC a [lo, hi] on Y (in distribution: b [lo, hi])'."""
    verb = fate(c["transferred"])
    tail = {"keeps": "", "falls to chance": " (its CI covers 0.5)",
            "reverses": " (below chance: the direction's sign does not carry over)"}[verb]
    verb = "keeps" if verb == "keeps" else f"{verb}:"
    return (f"fit on {train}, {what} {verb} AUROC {fmt_ci(c['transferred'])} on {test}{tail} (in distribution: "
            f"{fmt_ci(c['in_distribution'])})")


def summarize(result: dict) -> str:
    train, test = _side_name(result["train"]), _side_name(result["test"])
    diffs = result["differences"]
    lines = [("the two sides differ in " + "; ".join(
        f"{n.replace('_', ' ')} ({', '.join(v['train'])} -> {', '.join(v['test'])})" for n, v in diffs.items()))
        if diffs else "the two sides share dataset, prompt template and temperature: this measures transfer to "
                      "other problems of the same kind only"]
    traj = result["trajectory"]
    cells = traj["cells"]
    best = max(cells, key=lambda c: c["in_distribution"]["value"])
    lines.append(sentence(f"the trajectory probe at layer {best['layer']} ({best['aggregation']}; the best cell in "
                          "distribution)", best, train, test))
    kept = sum(fate(c["transferred"]) == "keeps" for c in cells)
    lines.append(f"{kept} of {len(cells)} trajectory cells keep an AUROC above chance on the test stores "
                 f"({traj['train_traces']} training traces of {traj['train_problems']} problems, "
                 f"{traj['test_traces']} test traces of {traj['test_problems']} problems)")
    lines.append("baselines refit on the training stores, on the test stores: " + ", ".join(
        f"{n.replace('_', ' ')} {fmt_ci(b['transferred'])}" for n, b in best["baselines"].items()))
    token = result["token"]
    for name, d in token["directions"].items():
        lines.append(sentence(f"the token probe's {name.replace('_', '-')} direction at layer {token['layer']} "
                              "(every token)", d["tokens"], train, test))
    chunk = result["chunk"]
    if chunk:
        top = max(chunk["layers"], key=lambda c: c["in_distribution"]["value"])
        lines.append(sentence(f"the chunk probe at layer {top['layer']} (the best layer in distribution)", top,
                              train, test))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
