"""Deterministic records with monitor scores and exit records, for the stores that hold them."""

import numpy as np

from conftest import make_record

FIELDS = ("chunk_probability", "token_score")


def monitored_record(index: int, monitor=True, exit=True, **kw):
    """make_record(index) plus monitor arrays (NaN on the prompt, a chunk probability at every 7th generated
    token and at the last) and an exit record (odd traces exit by rule probe or confidence, 3 forced tokens)."""
    rec = make_record(index, **kw)
    n, p = rec.n_tokens, rec.prompt_length
    rng = np.random.default_rng(1000 + index)
    gen = n - p
    if monitor:
        chunk = np.full(n, np.nan, np.float32)
        ends = list(range(p + 6, n, 7)) + [n - 1]
        chunk[ends] = rng.random(len(ends)).astype(np.float32)
        token = np.full(n, np.nan, np.float32)
        token[p:] = rng.standard_normal(gen).astype(np.float32)
        rec.monitor = {"chunk_probability": chunk, "token_score": token}
    if exit:
        if index % 2 and gen > 3:
            rec.exit = {"exit_chunk": index % 4, "rule": ("probe", "confidence")[index % 3 == 0],
                        "score": float(rng.random()), "thinking_tokens": gen - 3, "forced_tokens": 3}
        else:
            rec.exit = {"exit_chunk": -1, "rule": "none", "score": None, "thinking_tokens": gen, "forced_tokens": 0}
    return rec


def monitored_kwargs(**kw) -> dict:
    from conftest import writer_kwargs

    return writer_kwargs(monitor_fields=FIELDS, exit_table=True, **kw)


def assert_same_scores(trace, rec) -> None:
    """A trace read back carries the record's monitor arrays (bit for bit) and exit record."""
    assert sorted(trace.monitor) == sorted(rec.monitor)
    for name, values in rec.monitor.items():
        assert trace.monitor[name].dtype == np.float32
        assert trace.monitor[name].tobytes() == np.asarray(values, np.float32).tobytes(), name
    want = dict(rec.exit, score=float("nan") if rec.exit["score"] is None else np.float32(rec.exit["score"]))
    got = dict(trace.exit)
    assert np.isnan(got.pop("score")) if np.isnan(want["score"]) else got.pop("score") == want["score"]
    want.pop("score")
    assert got == want
