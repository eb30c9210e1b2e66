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
    }


def sampled_by(settings) -> str:
    """Which engine sampled the traces and how they were captured, from the store's generation settings."""
    settings = json.loads(settings) if isinstance(settings, (str, bytes)) else dict(settings or {})
    if settings.get("engine", "hf") == "hf":
        how = "tribunal's hf engine, captured while decoding"
    else:
        how = f"vLLM {settings.get('vllm_version', '?')}, captured by teacher forcing"
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
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
        "",
        t.text,
        "",
        "generated tokens (position, id, log-prob, entropy" + (", token)" if decode else "):"),
    ]
    gen = np.flatnonzero(t.is_generated)
    for pos in gen[:max_tokens]:
        token = f"  {decode(int(t.token_ids[pos]))!r}" if decode else ""
        lines.append(f"  {pos:6d}  {t.token_ids[pos]:7d}  {t.logprobs[pos]:8.3f}  {t.entropies[pos]:7.3f}{token}")
    if len(gen) > max_tokens:
        lines.append(f"  ... {len(gen) - max_tokens} more")
    return "\n".join(lines)

