"""Chunk probes: does the residual stream at the end of each reasoning chunk know whether that chunk's
intermediate answer is right? And how many tokens would stopping on it save?

Chunks and their answers come from tribunal/chunks.py, located in the stored tokens with the model's
tokenizer. Features: each chunk's last-token residual, per stored layer, gathered in one sequential pass
over each layer dataset (one layer's features in memory at a time). Per layer, through the trajectory
probe's own search (probes/search.py): the logistic probe on problem-grouped folds, per-fold metrics with
CIs that include refitting, one permutation null shared by all layers (so the best layer gets a
family-wise p), and for each outer fold the inner-CV score that nested selection uses.
Baselines on the same folds: the chunk's position (index, relative), tokens so far, output confidence over
the chunk (mean log-prob, entropy), and whether its answer equals the trace's final answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..chunks import intermediate_answers, token_ends
from ..errors import TribunalError
from ..grading import answers_match
from ..store.format import decode_activations
from ..store.reader import DEFAULT_BLOCK_BYTES, Store
from . import early_exit as ee
from . import evaluation as ev
from . import search, verdict
from .config import DEFAULTS
from .search import cv_predict, direction_of, make_probe


@dataclass
class ChunkData:
    """One row per answering chunk (in trace order), and per-trace facts for early exit."""

    trace: np.ndarray  # global trace index in the store
    problem: np.ndarray
    index: np.ndarray  # chunk index within its trace
    token_start: np.ndarray  # generated-token range of the chunk [start, end]
    token_end: np.ndarray
    answer: list
    y: np.ndarray  # 1 = the intermediate answer is correct
    baselines: dict = field(default_factory=dict)  # name -> (n, k) features
    confidence: np.ndarray | None = None  # exp(mean log-prob) over the chunk: the confidence exit rule's score
    traces: np.ndarray | None = None  # the store traces the early exit runs over
    trace_correct: np.ndarray | None = None
    trace_tokens: np.ndarray | None = None
    trace_problem: np.ndarray | None = None


def load_chunks(store: Store, decode_pieces, pattern=None, progress: bool = False) -> ChunkData:
    """Segment every trace's text, grade each chunk's answer and locate its last token.

    decode_pieces(token_ids) -> list of each token decoded alone (the model's tokenizer), and, for byte-level
    tokenizers whose pieces do not spell the text, decode_pieces.prefix(token_ids, n) -> the first n decoded.
    """
    rows = {k: [] for k in ("trace", "problem", "index", "start", "end", "answer", "y", "final", "n_gen", "lp", "ent")}
    per_trace = {"trace": [], "correct": [], "tokens": [], "problem": []}
    for i in tqdm(range(store.n_traces), desc="chunks", disable=not progress):
        t = store.trace(i)
        gen_ids = [int(x) for x in t.token_ids[t.prompt_length :]]
        if not gen_ids:
            continue
        per_trace["trace"].append(i)
        per_trace["correct"].append(t.label == "correct")
        per_trace["tokens"].append(len(gen_ids))
        per_trace["problem"].append(t.problem_id)
        chunks = intermediate_answers(t.text, t.gold)
        if not chunks:
            continue
        content_ends = [c.start + len(t.text[c.start : c.end].rstrip()) for c in chunks]
        prefix = getattr(decode_pieces, "prefix", None)
        ends = token_ends(decode_pieces(gen_ids), t.text, content_ends,
                          decode_prefix=(lambda n, ids=gen_ids: prefix(ids, n)) if prefix else None)
        logprob = t.logprobs[t.prompt_length :]
        entropy = t.entropies[t.prompt_length :]
        start = 0
        for k, (chunk, end) in enumerate(zip(chunks, ends)):
            end = max(end, start)
            rows["trace"].append(i)
            rows["problem"].append(t.problem_id)
            rows["index"].append(k)
            rows["start"].append(start)
            rows["end"].append(end)
            rows["answer"].append(chunk.answer)
            rows["y"].append(chunk.label == "correct")
            rows["final"].append(bool(t.predicted) and answers_match(chunk.answer, t.predicted))
            rows["n_gen"].append(len(gen_ids))
            rows["lp"].append(float(np.nanmean(logprob[start : end + 1])))
            rows["ent"].append(float(np.nanmean(entropy[start : end + 1])))
            start = end + 1
    if not rows["trace"]:
        raise TribunalError("no trace states an intermediate answer: nothing for a chunk probe to learn")
    trace_ids, counts = np.unique(rows["trace"], return_counts=True)
    n_chunks = counts[np.searchsorted(trace_ids, rows["trace"])]
    index = np.array(rows["index"])
    end = np.array(rows["end"], np.int64)
    lp = np.nan_to_num(np.array(rows["lp"]), nan=0.0)
    ent = np.nan_to_num(np.array(rows["ent"]), nan=0.0)
    return ChunkData(
        trace=np.array(rows["trace"]), problem=np.array(rows["problem"], np.int64), index=index,
        token_start=np.array(rows["start"], np.int64), token_end=end, answer=rows["answer"],
        y=np.array(rows["y"], int),
        baselines={"position": np.column_stack([index, (index + 1) / n_chunks, (end + 1) / np.array(rows["n_gen"])]),
                   "tokens_so_far": np.log1p(end + 1.0)[:, None], "confidence": np.column_stack([lp, ent]),
                   "equals_final": np.array(rows["final"], float)[:, None]},
        confidence=np.exp(lp), traces=np.array(per_trace["trace"]), trace_correct=np.array(per_trace["correct"]),
        trace_tokens=np.array(per_trace["tokens"], float), trace_problem=np.array(per_trace["problem"], np.int64))


def chunk_features(store: Store, layer: int, data: ChunkData, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """(chunks, d_model) float32: the residual at each chunk's last token of one layer.

    Only those rows are read (Shard.read_scattered), in file order, so the pass costs about what a memmap gather
    of the same rows does, not a read of the whole layer; block_bytes bounds each batch."""
    table = store.table
    rows = (table["token_start"][data.trace].astype(np.int64) + table["prompt_length"][data.trace].astype(np.int64)
            + data.token_end)
    shard_of = store.shard_of_trace[data.trace]
    out = np.empty((len(data.trace), store.d_model), np.float32)
    per_read = max(1, block_bytes // (store.d_model * 4))
    for s, shard in enumerate(store.shards):
        mine = np.flatnonzero(shard_of == s)
        if not len(mine):
            continue
        wanted = rows[mine]
        ordered = bool(np.all(np.diff(wanted) > 0))  # chunk ends come in file order: usually nothing to sort
        if not ordered:
            wanted, where = np.unique(wanted, return_inverse=True)
        values = None if ordered else np.empty((len(wanted), store.d_model), np.float32)
        for lo in range(0, len(wanted), per_read):
            words = decode_activations(shard.read_scattered(layer, wanted[lo : lo + per_read]), store.dtype)
            if ordered:
                out[mine[lo : lo + per_read]] = words
            else:
                values[lo : lo + per_read] = words
        if not ordered:
            out[mine] = values[where]
    return out


def evaluate_chunk_probe(store: Store, data: ChunkData, folds: int = DEFAULTS.folds, seed: int = DEFAULTS.seed,
                         permutations: int = DEFAULTS.permutations, C: float = DEFAULTS.C,
                         margin: float = DEFAULTS.margin, block_bytes: int = DEFAULT_BLOCK_BYTES,
                         progress: bool = False, trial_answer=None) -> dict:
    """Per-layer chunk probes with baselines, nested layer selection, calibration and early exit, reading one
    layer's chunk-end features at a time. trial_answer: see early_exit_evaluation."""
    return evaluate_chunk_layers(data, list(store.layers), lambda layer: chunk_features(store, layer, data, block_bytes),
                                 folds, seed, permutations, C, margin, progress, trial_answer)


def evaluate_chunk_layers(data: ChunkData, layers, features, folds: int = DEFAULTS.folds, seed: int = DEFAULTS.seed,
                          permutations: int = DEFAULTS.permutations, C: float = DEFAULTS.C,
                          margin: float = DEFAULTS.margin, progress: bool = False, trial_answer=None) -> dict:
    """evaluate_chunk_probe on features(layer) -> (chunks, d) arrays: what the store supplies, or a simulation."""
    y, groups = data.y, data.problem
    d = search.design(y, groups, folds, seed, permutations)
    base = {name: cv_predict(make_probe, X, y, d.outer) for name, X in data.baselines.items()}
    candidates, layer_rows = [], []
    for layer in tqdm(layers, desc=f"chunk probe layers (each with {permutations} permutations)", disable=not progress):
        X = features(layer)
        cand = search.score_candidate(d, int(layer), X, C)
        candidates.append(cand)
        layer_rows.append({"layer": int(layer), "metrics": cand.metrics, "inner_auroc": cand.inner_auroc,
                           "permutation_p": cand.permutation_p, "refit_variance": cand.refit,
                           **direction_of(make_probe(C).fit(X, y))})
    chosen = search.select(d, candidates, "layers")
    nested = chosen["oof_probability"]
    inner_for_exit = [(tr, candidates[j].inner_oof[k]) for k, ((tr, _), j) in enumerate(zip(d.outer, chosen["chosen"]))]
    final = max(layer_rows, key=lambda c: c["metrics"]["auroc"]["value"])
    paired = {name: ev.paired_auroc_difference(y, nested, s, d.outer, groups, chosen["refit"]["auroc"], df=d.nested_df)
              for name, s in base.items()}
    per_fold = {}
    for j in chosen["chosen"]:
        per_fold[str(layer_rows[j]["layer"])] = per_fold.get(str(layer_rows[j]["layer"]), 0) + 1
    selection = {
        "method": f"nested problem-grouped CV over layers: {folds} outer folds, each choosing the layer by inner "
                  "grouped CV on its training problems only",
        "chosen_per_fold": dict(sorted(per_fold.items(), key=lambda kv: -kv[1])), "folds_agree": len(per_fold) == 1,
        "nested_metrics": chosen["nested_metrics"], "refit_variance": chosen["refit"],
        "family_wise": chosen["family_wise"],
        "final": {"layer": final["layer"], "aggregation": "chunk_end", "folds_won": per_fold.get(str(final["layer"]), 0),
                  "folds": folds, "rule": "the selection refit on all problems: the layer with the highest "
                                          "problem-grouped CV ROC-AUC over every chunk"},
        "calibration": ev.calibration(y, nested),
    }
    result = {
        "chunks": int(len(y)), "traces": int(len(np.unique(data.trace))), "problems": int(len(np.unique(groups))),
        "positive_rate": float(y.mean()), "folds": folds, "intervals": ev.INTERVALS, "layers": layer_rows,
        "selection": selection, "baselines": {name: ev.cv_metrics(y, s, d.outer, groups) for name, s in base.items()},
        "auroc_minus_baseline": paired, "beats": {n: bool(v["ci"][0] > 0) for n, v in paired.items()},
        "oof_probability": nested.tolist(), "labels": y.tolist(),
    }
    result["early_exit"] = early_exit_evaluation(data, nested, inner_for_exit, d.outer, margin, selection, trial_answer)
    return result


def early_exit_evaluation(data: ChunkData, nested, inner_for_exit, outer, margin: float, selection: dict,
                          trial_answer=None) -> dict:
    """Curves over thresholds and the nested headline for the probe rule and its baselines, on the same traces,
    and the `auto` thresholds (exit_thresholds): each rule's choose_threshold on ALL traces' out-of-fold scores.

    trial_answer: optional per-chunk array aligned with data's rows, the model's probability of the trial answer it
    writes when the answer cue is forced after the chunk (DEER's rule, arXiv 2504.15895); it adds a rule chosen
    like confidence's. Every exit here, that rule's included, answers with the chunk's intermediate answer (the
    trial answer can differ from it; exit_calibration.csv carries its correctness where it is known)."""
    position = {t: j for j, t in enumerate(data.traces)}
    case = ee.ExitCase(chunk_trace=np.array([position[t] for t in data.trace]), chunk_tokens=data.token_end + 1.0,
                       chunk_correct=data.y, trace_correct=data.trace_correct, trace_tokens=data.trace_tokens,
                       trace_group=data.trace_problem)
    test_problems = [np.unique(data.problem[te]) for _, te in outer]
    trace_folds = []
    for k, problems in enumerate(test_problems):  # a problem without answering chunks joins fold 0's test side
        test = np.flatnonzero(np.isin(case.trace_group, problems)) if k else np.flatnonzero(
            np.isin(case.trace_group, problems) | ~np.isin(case.trace_group, data.problem))
        trace_folds.append((np.setdiff1d(np.arange(len(case.trace_group)), test), test))
    full = ee.summary(case.trace_correct, case.trace_tokens, case.trace_tokens)

    def train_chunks(k):
        return np.isin(case.chunk_trace, trace_folds[k][0])

    def nested_threshold(train_score, act_score):
        """Each fold's threshold chosen on its training traces' train_score(k), then acted on with act_score."""
        def choose(train_case, k):
            return ee.choose_threshold(train_case, train_score(k), margin)

        def apply(tau, test):
            correct, tokens = case.threshold_rule(act_score, tau)
            return correct[test], tokens[test]
        return ee.nested_outcome(case, trace_folds, choose, apply)

    def fraction_apply(f, test):
        correct, tokens = case.fraction_rule(f)
        return correct[test], tokens[test]

    # the probe acts on the nested (outer) probabilities and chooses on inner-CV ones, which never saw the test fold
    inner = np.full((len(outer), len(data.y)), -1.0)
    for k, (tr, prob) in enumerate(inner_for_exit):
        inner[k, tr] = prob
    score_all, confidence = np.asarray(nested), data.confidence
    scores = {"probe": score_all, "confidence": confidence}
    rules = {
        "probe": (score_all, nested_threshold(lambda k: inner[k][train_chunks(k)], score_all)),
        "confidence": (confidence, nested_threshold(lambda k: confidence[train_chunks(k)], confidence)),
        "fixed_fraction": (None, ee.nested_outcome(case, trace_folds,
                                                   lambda train_case, k: ee.choose_fraction(train_case, margin),
                                                   fraction_apply)),
    }
    if trial_answer is not None:
        trial = scores["trial_answer"] = np.asarray(trial_answer, float)
        rules["trial_answer"] = (trial, nested_threshold(lambda k: trial[train_chunks(k)], trial))
    first = case.first_answer_rule()
    out = {"margin": margin, "full": {**full, "accuracy": float(np.mean(case.trace_correct))},
           "traces": int(len(case.trace_correct)), "rules": {}, "curves": {}}
    for name, (score, (correct, tokens, chosen)) in rules.items():
        out["rules"][name] = {**ee.interval_summary(correct, tokens, case.trace_tokens, case.trace_correct,
                                                    case.trace_group), "chosen_per_fold": chosen}
    out["rules"]["first_answer"] = {**ee.interval_summary(*first, case.trace_tokens, case.trace_correct,
                                                          case.trace_group), "chosen_per_fold": []}
    for name, score in scores.items():
        out["curves"][name] = [{"threshold": tau, **ee.summary(*case.threshold_rule(score, tau), case.trace_tokens)}
                               for tau in ee.THRESHOLDS]
    out["curves"]["fixed_fraction"] = [{"fraction": f, **ee.summary(*case.fraction_rule(f), case.trace_tokens)}
                                       for f in ee.FRACTIONS]
    out["exit_thresholds"], out["exit_thresholds_how"] = {}, {}
    what = {"probe": "the out-of-fold (nested) probe probability", "confidence": "exp(mean log-prob) over the chunk",
            "trial_answer": "the trial answer's probability with the answer cue forced after the chunk"}
    for name, score in scores.items():
        tau = ee.choose_threshold(case, score, margin)
        point = ee.summary(*case.threshold_rule(score, tau), case.trace_tokens)
        out["exit_thresholds"][name] = None if np.isinf(tau) else tau
        out["exit_thresholds_how"][name] = {
            "rule": f"early_exit.choose_threshold on all {len(case.trace_correct)} traces' {what[name]}: the most "
                    f"tokens saved at accuracy >= full accuracy - {margin:g} (null: none saves any, never exit)",
            "margin": margin, "accuracy": point["accuracy"], "tokens_saved": point["tokens_saved"],
            "per_fold": [None if np.isinf(t) else t for t in out["rules"][name]["chosen_per_fold"]]}
    out.update(verdict.early_exit(out, signal=not verdict.is_null(selection)))
    return out


def chunk_logits(doc: dict, store: Store, data: ChunkData, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """The saved chunk direction's logit at each chunk end of `data` (weight_norm * (u . x) + bias); refused for a
    directions file without a chunk probe, or one of another width or a layer the store lacks."""
    chunk = doc.get("chunk")
    if not chunk:
        raise TribunalError("the directions file has no chunk probe; run `tribunal probe chunks` first")
    d = chunk["direction"]
    if len(d["direction"]) != store.d_model:
        raise TribunalError(f"the chunk direction has d_model {len(d['direction'])}, the store {store.d_model}: "
                            "it comes from another model")
    if d["layer"] not in store.layers:
        raise TribunalError(f"the chunk direction is for layer {d['layer']}, which the store lacks "
                            f"(it has {list(store.layers)}); sample it with that layer among --layers")
    X = chunk_features(store, d["layer"], data, block_bytes)
    return float(d["weight_norm"]) * (X.astype(np.float64) @ np.asarray(d["direction"])) + float(d["bias"])


def score_chunk_ends(doc: dict, store: Store, decode_pieces, out_csv, pattern=None,
                     block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict:
    """The online monitor: every chunk end of the stored traces scored with the saved chunk direction
    (logit = weight_norm * (u . x) + bias; probability = its sigmoid), written to a CSV."""
    import csv

    data = load_chunks(store, decode_pieces, pattern)
    logits = chunk_logits(doc, store, data, block_bytes)
    layer = doc["chunk"]["direction"]["layer"]
    with open(out_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trace", "problem_id", "chunk", "token_end", "answer", "label", "logit", "probability"])
        for j in range(len(data.y)):
            w.writerow([int(data.trace[j]), int(data.problem[j]), int(data.index[j]), int(data.token_end[j]),
                        data.answer[j], "correct" if data.y[j] else "incorrect", f"{logits[j]:.6g}",
                        f"{1 / (1 + np.exp(-logits[j])):.4f}"])
    return {"layer": layer, "chunks": int(len(data.y)), "csv": str(out_csv), "logits": logits}
