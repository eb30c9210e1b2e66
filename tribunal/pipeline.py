"""The commands that chain steps across packages: `tribunal run` (generate, the three probes, one-page report, in
one run folder), the settings of `slurm submit`'s generate and probe jobs, the chunk probe and `tribunal score`
(which need the store's tokenizer from traces/).

The one module that chains the steps (problems -> traces -> store -> probes -> report); the steps never
import each other backwards. Every option is checked before anything is created, so bad input leaves nothing
behind.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from .cluster.slurm import PROBE_JOB, SubmitConfig
from .errors import TribunalError
from .probes.config import ProbeConfig
from .probes.tokens import MIN_PROBLEMS as MIN_TOKEN_PROBE_PROBLEMS
from .report.markdown import write_report
from .report.outputs import chunk_outputs, token_outputs, trajectory_outputs
from .store import open_store
from .traces.generate import run_generation
from .traces.models import EMBEDDED_MODEL, piece_decoder
from .traces.settings import GenerateConfig

STORE_NAME = "store.h5"


def split_options(options: dict) -> tuple[dict, dict]:
    """`run` and `slurm submit` options -> (GenerateConfig's, ProbeConfig's). A name both define (seed) goes to
    both: one --seed seeds the sampling and every probe."""
    generate = {f.name for f in GenerateConfig.cli_fields()}
    probes = {f.name for f in ProbeConfig.cli_fields()}
    unknown = sorted(set(options) - generate - probes)
    if unknown:
        raise TribunalError(f"unknown option(s) {unknown}")
    return ({k: v for k, v in options.items() if k in generate}, {k: v for k, v in options.items() if k in probes})


def submit_config(run_dir, options: dict, probe_args=(), **slurm) -> SubmitConfig:
    """`tribunal slurm submit`'s settings: the generator's options go to every array task, ProbeConfig's
    (checked here) become the probe job's arguments (`probe_args` extra ones for the trajectory probe); one
    --seed seeds both. slurm: the other SubmitConfig fields."""
    generate, probe_options = split_options(options)
    probes = ProbeConfig(**probe_options).validate()
    args = {probe: probes.arguments(probe) for probe in PROBE_JOB}
    args["trajectory"] += [str(a) for a in probe_args]
    return SubmitConfig(run_dir=run_dir, generate=generate, probe_args=args, **slurm)


def run_pipeline(run_dir, options: dict, progress: bool = True) -> dict:
    """Generate into RUN/store.h5 (resuming), probe it, write RUN/report.md. Returns what each step said.

    options: GenerateConfig and ProbeConfig fields (split_options). All are checked first; the run folder
    appears when the store writer opens, once the model and problems have loaded."""
    run = Path(run_dir)
    generate, probe_options = split_options(options)
    config = GenerateConfig(out=str(run / STORE_NAME), progress=progress, **generate).validate()
    probes = asdict(ProbeConfig(**probe_options).validate())
    enough = max(probes["folds"], MIN_TOKEN_PROBE_PROBLEMS)
    if config.max_problems < enough:
        raise TribunalError(f"--max-problems {config.max_problems} cannot fill {probes['folds']} problem-grouped folds "
                            f"and the token probe's held-out problems: give at least {enough}")
    started = time.time()
    gen = run_generation(config)
    result = {"generate": gen, "run_dir": str(run)}
    if gen["status"] != "done":
        return result
    store = run / STORE_NAME
    traj = trajectory_outputs(store, run, progress=progress, **probes)
    tok = token_outputs(store, run, layer=traj["result"]["selection"]["final"]["layer"], progress=progress, **probes)
    with open_store(store) as opened:
        decoder = piece_decoder(opened.model_id, config.model)  # a hub model's tokenizer: generate just loaded it
    deer = trial_answer_rows(store, config.model or str(EMBEDDED_MODEL), decoder, None, progress,
                             **{k: getattr(config, k) for k in ("revision", "compute_dtype", "device_map",
                                                               "trust_remote_code")})
    chunks = chunk_outputs(store, run, decoder, progress=progress, **deer, **probes)
    result.update(trajectory=traj["summary"], tokens=tok["summary"], chunks=chunks["summary"])
    write_report(run / "report.md", gen, traj, tok, time.time() - started, chunks)
    return result


def chunk_probe(stores, out_dir, tokenizer: str | None = None, cues: str | None = None, chunk_regex: str | None = None,
                model: str | None = None, progress: bool = True, **options) -> dict:
    """`tribunal probe chunks`: chunk ends found with the store's tokenizer (or `tokenizer`) at the reflection
    `cues` (a comma list; default chunks.DEFAULT_CUES) and `chunk_regex`; options are ProbeConfig fields. `model`
    (the store's model, a path or hub id) adds DEER's trial-answer rule to the early-exit baselines."""
    from .chunks import DEFAULT_CUES, cue_pattern

    ProbeConfig(**options).validate()
    with open_store(stores) as store:
        model_id = store.model_id
    cue_list = tuple(c.strip() for c in cues.split(",")) if cues else DEFAULT_CUES
    pattern = cue_pattern(cue_list, chunk_regex)
    decoder = piece_decoder(model_id, tokenizer)
    deer = trial_answer_rows(stores, model, decoder, pattern, progress) if model else {}
    return chunk_outputs(stores, out_dir, decoder, pattern=pattern, progress=progress,
                         chunking={"cues": list(cue_list), "extra": chunk_regex}, **deer, **options)


def trial_answer_rows(stores, model: str, decoder, pattern=None, progress: bool = True, **load) -> dict:
    """DEER's trial-answer confidence and correctness at each answering chunk of the stores (probe_chunks'
    trial_answer, trial_answer_correct), with `model` loaded by traces.models.load_model (`load`: its options)."""
    from .probes.chunk_probe import load_chunks
    from .traces.capture.trial_answer import store_trial_answers

    with open_store(stores) as store:
        rows = load_chunks(store, decoder, pattern)
        trial = store_trial_answers(store, model, rows.trace, rows.token_end, progress=progress, **load)
    return {"trial_answer": trial["confidence"], "trial_answer_correct": trial["correct"]}


def score_stores(directions, stores, out_csv, layer: int | None = None, aggregation: str | None = None,
                 chunk_ends: bool = False, tokenizer: str | None = None) -> dict:
    """`tribunal score`: per-token logits of a saved trajectory cell, or with chunk_ends the chunk direction's
    logit at every chunk end, into OUT_CSV (its folder is created; on failure nothing is left behind)."""
    from .probes import directions as dirs
    from .probes.chunk_probe import score_chunk_ends

    doc = dirs.load(directions)
    with open_store(stores) as store, _new_file(out_csv):
        if chunk_ends:
            return score_chunk_ends(doc, store, piece_decoder(store.model_id, tokenizer), out_csv)
        return dirs.score_store(doc, store, out_csv, layer, aggregation)


@contextmanager
def _new_file(path):
    """Create PATH's missing folders for the body to write PATH; if the body fails, remove what it wrote
    and the folders made here."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not existed:
            path.unlink(missing_ok=True)
        for folder in made:  # deepest first
            with suppress(OSError):  # not empty: something else writes there now
                folder.rmdir()
        raise
