"""A probe's numbers and its figure, written together: what `tribunal probe ...` and `tribunal run` call.

The probes compute and return; this module draws what they returned (the flow is one way: report -> probes).
"""

from __future__ import annotations

from pathlib import Path

from ..probes.run import probe_tokens, probe_trajectory
from .plots import probe_results, token_probe

TRAJECTORY_FIGURE = "probe_results.png"
TOKEN_FIGURE = "token_probe.png"


def trajectory_outputs(stores, out_dir, **options) -> dict:
    """probe_trajectory, then its figure (AUROC by layer beside baselines, held-out logits, reliability)."""
    done = probe_trajectory(stores, out_dir, **options)
    probe_results(done["result"], Path(out_dir) / TRAJECTORY_FIGURE)
    return done


def token_outputs(stores, out_dir, **options) -> dict:
    """probe_tokens, then its figure (AUROC by position, projection curves)."""
    done = probe_tokens(stores, out_dir, **options)
    token_probe(done["token"], Path(out_dir) / TOKEN_FIGURE)
    return done
