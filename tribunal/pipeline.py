"""`tribunal run`: the main job in one command: generate, both probes, one-page report, in one run folder.

The one module that chains the steps (problems -> traces -> store -> probes -> report); the steps never
import each other backwards.
"""

from __future__ import annotations

import time
from pathlib import Path

from .report.markdown import write_report
from .report.outputs import chunk_outputs, token_outputs, trajectory_outputs
from .traces.generate import GenerateConfig, format_summary, run_generation
from .traces.models import piece_decoder

STORE_NAME = "store.h5"


def run_pipeline(run_dir, generate_options: dict, probe_options: dict | None = None, progress: bool = True) -> dict:
    """Generate into RUN/store.h5 (resuming), probe it, write RUN/report.md. Returns what each step said."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    probe_options = probe_options or {}
    started = time.time()
    gen = run_generation(GenerateConfig(out=str(run / STORE_NAME), progress=progress, **generate_options))
    result = {"generate": gen, "run_dir": str(run)}
    if gen["status"] != "done":
        return result
    store = run / STORE_NAME
    traj = trajectory_outputs(store, run, k=probe_options.get("k", 10), folds=probe_options.get("folds", 5),
                              n_boot=probe_options.get("n_boot", 1000),
                              permutations=probe_options.get("permutations", 50), seed=probe_options.get("seed", 0),
                              progress=progress)
    tok = token_outputs(store, run, layer=traj["result"]["selection"]["final"]["layer"],
                        memory_bytes=probe_options.get("memory_bytes", 1 << 30), seed=probe_options.get("seed", 0),
                        n_boot=probe_options.get("token_bootstrap", 500))
    from .store import open_store

    with open_store(store) as opened:
        decoder = piece_decoder(opened.model_id)
    chunks = chunk_outputs(store, run, decoder, folds=probe_options.get("folds", 5),
                           n_boot=probe_options.get("n_boot", 1000), permutations=probe_options.get("permutations", 50),
                           seed=probe_options.get("seed", 0), memory_bytes=probe_options.get("memory_bytes", 1 << 30),
                           progress=progress)
    result.update(trajectory=traj["summary"], tokens=tok["summary"], chunks=chunks["summary"])
    write_report(run / "report.md", format_summary(gen), traj, tok, time.time() - started, chunks)
    return result
