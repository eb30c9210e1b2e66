"""What a person wants to know about a store at a glance (`tribunal inspect`)."""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from . import format as fmt
from .lock import read_holder, writer_is_live
from .reader import Store


def summarize(store: Store) -> dict:
    """Machine-readable summary; the keys are a contract for `inspect --json`."""
    size = sum(s.size_bytes() for s in store.shards)
    bytes_per_token = len(store.layers) * store.d_model * fmt.DTYPES[store.dtype][2]
    writers = []
    for shard in store.shards:
        live = writer_is_live(shard.path)
        holder = read_holder(shard.path) if live else None
        writers.append({"path": str(shard.path), "live": live, "holder": holder, "committed": shard.committed})
    attrs = store.attrs
    return {
        "stores": [str(s.path) for s in store.shards],
        "schema_version": int(attrs["schema_version"]),
        "model": store.model_id,
        "model_revision": attrs.get("model_revision"),
        "layers": list(store.layers),
        "d_model": store.d_model,
        "dtype": store.dtype,
        "traces": store.n_traces,
        "tokens": store.n_tokens,
        "generated_tokens": int(store.generated_lengths.sum()) if store.n_traces else 0,
        "labels": store.label_counts(),
        "problems": int(len(np.unique(store.table["problem_id"]))) if store.n_traces else 0,
        "bytes_per_token": bytes_per_token,
        "size_on_disk": size,
        "activation_bytes": bytes_per_token * store.n_tokens,
        "committed": {"traces": store.n_traces, "tokens": store.n_tokens,
                      "commits": sum(s.committed["commits"] for s in store.shards)},
        "writer_live": any(w["live"] for w in writers),
        "writers": writers,
        "dataset": {"id": attrs.get("dataset_id"), "split": attrs.get("dataset_split")},
        "seed": attrs.get("seed"),
        "generation_settings": attrs.get("generation_settings"),
        "sampled_by": sampled_by(attrs.get("generation_settings")),
        "tribunal_version": attrs.get("tribunal_version"),
        "created": attrs.get("created"),
        "host": attrs.get("host"),
        "chunk_tokens": attrs.get("chunk_tokens"),
        "monitor": monitor_summary(store),
        "exit": exit_summary(store),
        "interventions": [{"store": path, **how} for path, how in store.interventions],
    }


def _settings(store: Store) -> dict:
    settings = store.attrs.get("generation_settings")
    settings = json.loads(settings) if isinstance(settings, (str, bytes)) else settings
    return settings if isinstance(settings, dict) else {}


def monitor_summary(store: Store) -> dict | None:
    """The monitor scores a store holds and how they were made (generation_settings["monitor"]), or None."""
    if not store.monitor_fields:
        return None
    return {"fields": list(store.monitor_fields), "settings": _settings(store).get("monitor")}


def exit_summary(store: Store) -> dict | None:
    """The exit policy (generation_settings["exit_policy"]) and what it did: traces exited, by rule, and the
    generated tokens split into thinking and forced-answer tokens; None for a store without exit records."""
    table = store.exit_table
    if table is None:
        return None
    codes = np.bincount(table["rule"].astype(np.int64), minlength=len(fmt.EXIT_RULES))
    by_rule = {name: int(codes[code]) for code, name in enumerate(fmt.EXIT_RULES) if name != "none"}
    return {"policy": _settings(store).get("exit_policy"), "traces": int(len(table)),
            "exited": int(sum(by_rule.values())), "by_rule": by_rule,
            "thinking_tokens": int(table["thinking_tokens"].astype(np.int64).sum()),
            "forced_tokens": int(table["forced_tokens"].astype(np.int64).sum())}


def sampled_by(settings) -> str:
    """Which engine sampled the traces and how they were captured, from the store's generation settings."""
    settings = json.loads(settings) if isinstance(settings, (str, bytes)) else dict(settings or {})
    if settings.get("engine", "hf") == "hf":
        how = "tribunal's hf engine, captured while decoding"
    else:
        how = f"vLLM {settings.get('vllm_version', '?')}, " + (
            "captured inside vLLM's forward" if settings.get("capture") == "inline" else "captured by teacher forcing")
    if settings.get("captured_by", "").startswith("tribunal capture"):
        how += "; re-captured by tribunal capture"
    if settings.get("per_trace_seeds") is False:
        how += "; per-trace seeds not honoured (vLLM on CPU): reproducible as a run only"
    return how


def format_summary(info: dict) -> str:
    """The human table printed by `tribunal inspect`."""
    labels = ", ".join(f"{n} {name}" for name, n in info["labels"].items())
    live = [w for w in info["writers"] if w["live"]]
    if live:
        holders = "; ".join(
            f"{w['path']}: pid {(w['holder'] or {}).get('pid', '?')} on {(w['holder'] or {}).get('host', '?')}" for w in live
        )
        writer = f"LIVE ({holders}); showing the committed snapshot"
    else:
        writer = "none (closed or died; the next append repairs and resumes)"
    overhead = info["size_on_disk"] / info["activation_bytes"] if info["activation_bytes"] else float("nan")
    rows = [
        ("store", ", ".join(info["stores"]) if len(info["stores"]) <= 3 else f"{len(info['stores'])} shards"),
        ("schema", f"v{info['schema_version']} (tribunal {info['tribunal_version']})"),
        ("model", f"{info['model']} @ {info['model_revision']}"),
        ("layers", f"{info['layers']}  (d_model {info['d_model']}, {info['dtype']})"),
        ("sampled by", info["sampled_by"]),
        ("dataset", f"{info['dataset']['id']} [{info['dataset']['split']}], seed {info['seed']}"),
        ("traces", f"{info['traces']} from {info['problems']} problems: {labels}"),
        ("tokens", f"{info['tokens']} ({info['generated_tokens']} generated)"),
        ("bytes/token", f"{info['bytes_per_token']:,} ({len(info['layers'])} layers x {info['d_model']} x {info['dtype']})"),
        ("size on disk", f"{tqdm.format_sizeof(info['size_on_disk'], 'B', 1024)} ({overhead:.3f}x the activation bytes)"),
        ("committed", f"{info['committed']['traces']} traces, {info['committed']['tokens']} tokens, "
                      f"{info['committed']['commits']} commits"),
        ("writer", writer),
    ]
    if info.get("monitor"):
        rows.append(("monitor", _describe_monitor(info["monitor"])))
    if info.get("exit"):
        rows.append(("early exit", _describe_exit(info["exit"])))
    for how in info.get("interventions", []):
        rows.append(("STEERED", _describe_intervention(how)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _describe_intervention(how: dict) -> str:
    """One steered shard: what was done where, and that its traces are not the model's own behaviour."""
    what = (f"{how.get('direction')} direction projected out" if how.get("kind") == "ablate" else
            f"alpha {how.get('alpha'):+g} x sigma {how.get('sigma', float('nan')):.4g} along the {how.get('direction')} "
            "direction" + (f" {how['random_index']}" if how.get("random_index") is not None else ""))
    return (f"{how.get('store')}: arm {how.get('arm')}: {what} at layer {how.get('layer')}, every generated position "
            "(tribunal steer); not the model's own behaviour: the probes refuse it without --allow-steered")


def _describe_monitor(monitor: dict) -> str:
    text = "scores stored per token: " + ", ".join(monitor["fields"])
    how = monitor.get("settings") or {}
    layers = [f"{what} layer {how[key]}" for key, what in (("chunk_layer", "chunk probe"), ("token_layer", "token direction"))
              if how.get(key) is not None]
    if layers or how.get("probes"):
        text += " (" + ", ".join(layers + ([f"probes {how['probes']}"] if how.get("probes") else [])) + ")"
    return text


def _describe_exit(exit: dict) -> str:
    policy = exit.get("policy") or {}
    parts = []
    if policy:
        threshold = policy.get("threshold")
        spec = policy.get("threshold_spec")
        parts.append(f"rule {policy.get('rule', '?')} >= {threshold if threshold is not None else '?'}"
                     + (f" ({spec})" if spec not in (None, "", threshold, str(threshold)) else "")
                     + (f", answer {policy['answer']}" if policy.get("answer") else ""))
    rules = ", ".join(f"{n} {rule}" for rule, n in exit["by_rule"].items() if n) or "none"
    parts.append(f"{exit['exited']} of {exit['traces']} traces exited ({rules})")
    parts.append(f"{exit['thinking_tokens']:,} thinking + {exit['forced_tokens']:,} forced-answer tokens")
    return "; ".join(parts)


def format_trace(store: Store, index: int, max_tokens: int = 400, decode=None) -> str:
    """One trace's text, label and its generated tokens with their log-probs.

    decode: optional callable token_id -> text (the CLI passes a tokenizer's; the store loads none).
    """
    t = store.trace(index)
    lines = [
        f"trace {t.index} (id {t.trace_id}) of {t.shard}",
        f"problem {t.problem_id}, sample {t.sample_index}: {t.label.upper()}  "
        f"predicted {t.predicted or '-'}  gold {t.gold or '-'}  finish {t.finish_reason}",
        f"tokens: {t.prompt_length} prompt + {t.n_tokens - t.prompt_length} generated",
    ]
    if t.exit is not None:
        lines.append(_exit_line(t.exit))
    lines += ["", t.text, ""]
    monitor = t.monitor or {}
    per_token = [name for name in monitor if name != fmt.CHUNK_PROBABILITY]  # a column each in the token table
    if fmt.CHUNK_PROBABILITY in monitor:
        lines += _chunk_lines(t, monitor[fmt.CHUNK_PROBABILITY], decode) + [""]
    for name in per_token:
        lines += [_score_line(name, monitor[name])]
    if per_token:
        lines.append("")
    lines.append("generated tokens (position, id, log-prob, entropy" + "".join(f", {n}" for n in per_token)
                 + (", token)" if decode else "):"))
    gen = np.flatnonzero(t.is_generated)
    for pos in gen[:max_tokens]:
        token = f"  {decode(int(t.token_ids[pos]))!r}" if decode else ""
        scores = "".join(f"  {monitor[n][pos]:8.3f}" for n in per_token)
        lines.append(f"  {pos:6d}  {t.token_ids[pos]:7d}  {t.logprobs[pos]:8.3f}  {t.entropies[pos]:7.3f}{scores}{token}")
    if len(gen) > max_tokens:
        lines.append(f"  ... {len(gen) - max_tokens} more")
    return "\n".join(lines)



def _exit_line(exit: dict) -> str:
    if exit["rule"] == "none":
        return f"early exit: none (thought to the end: {exit['thinking_tokens']} thinking tokens)"
    return (f"early exit: rule {exit['rule']} fired at answering chunk {exit['exit_chunk']} (score {exit['score']:.3f}): "
            f"{exit['thinking_tokens']} thinking + {exit['forced_tokens']} forced-answer tokens")


def _chunk_lines(t, probability, decode) -> list[str]:
    """Each answering chunk's probe probability at its last token, with the token-score span it closes."""
    ends = np.flatnonzero(~np.isnan(probability))
    lines = [f"chunk probe probability at each answering chunk's last token ({len(ends)} chunks"
             + ("; token score over the chunk: mean, min, max" if "token_score" in (t.monitor or {}) else "") + "):"]
    start = t.prompt_length
    for i, pos in enumerate(ends):
        token = f"  {decode(int(t.token_ids[pos]))!r}" if decode else ""
        span = ""
        if "token_score" in t.monitor:
            scores = t.monitor["token_score"][start : pos + 1]
            scores = scores[~np.isnan(scores)]
            if len(scores):
                span = f"   token score {scores.mean():7.3f} {scores.min():7.3f} {scores.max():7.3f}"
        lines.append(f"  chunk {i:3d}  token {pos:6d}  p {probability[pos]:.3f}{span}{token}")
        start = pos + 1
    return lines


def _score_line(name: str, values) -> str:
    """first / last / min / max of a per-token score over the tokens it scored."""
    scored = np.flatnonzero(~np.isnan(values))
    if not len(scored):
        return f"{name}: no token scored"
    lo, hi = scored[np.argmin(values[scored])], scored[np.argmax(values[scored])]
    return (f"{name} over {len(scored)} tokens: first {values[scored[0]]:.3f}, last {values[scored[-1]]:.3f}, "
            f"min {values[lo]:.3f} (token {lo}), max {values[hi]:.3f} (token {hi})")
