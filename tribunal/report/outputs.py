"""A probe's numbers and its figure, written together: what `tribunal probe ...` and `tribunal run` call.

The probes compute and return; this module draws what they returned (the flow is one way: report -> probes).
"""

from __future__ import annotations

from pathlib import Path

from ..probes.run import probe_chunks, probe_tokens, probe_trajectory
from ..probes.transfer import transfer
from .plots import (chunk_probe_figure, early_exit_figure, probe_results_figure, save, token_probe_figure,
                    transfer_figure)

TRAJECTORY_FIGURE = "probe_results.png"
TOKEN_FIGURE = "token_probe.png"
CHUNK_FIGURE = "chunk_probe.png"
EXIT_FIGURE = "early_exit.png"
TRANSFER_FIGURE = "transfer.png"


def trajectory_outputs(stores, out_dir, **options) -> dict:
    """probe_trajectory, then its figure (AUROC by layer beside baselines, held-out logits, reliability)."""
    done = probe_trajectory(stores, out_dir, **options)
    save(probe_results_figure(done["result"]), Path(out_dir) / TRAJECTORY_FIGURE)
    return done


def token_outputs(stores, out_dir, **options) -> dict:
    """probe_tokens, then its figure (AUROC by position, projection curves)."""
    done = probe_tokens(stores, out_dir, **options)
    save(token_probe_figure(done["token"]), Path(out_dir) / TOKEN_FIGURE)
    return done


def chunk_outputs(stores, out_dir, decode_pieces, **options) -> dict:
    """probe_chunks, then its figures (AUROC by layer beside baselines with a reliability diagram; early exit)."""
    done = probe_chunks(stores, out_dir, decode_pieces, **options)
    save(chunk_probe_figure(done["result"]), Path(out_dir) / CHUNK_FIGURE)
    save(early_exit_figure(done["result"]), Path(out_dir) / EXIT_FIGURE)
    return done


def transfer_outputs(train, test, out_dir, decode_pieces=None, **options) -> dict:
    """probes.transfer (transfer.json, transfer.csv), then its figure (in distribution against transferred)."""
    done = transfer(train, test, out_dir, decode_pieces, **options)
    save(transfer_figure(done), Path(out_dir) / TRANSFER_FIGURE)
    return done
