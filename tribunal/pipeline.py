"""The commands that chain steps across packages: `tribunal run` (generate, the three probes, one-page report, in
one run folder; with --early-exit a second sampling under the run's own exit policy, measured against the first),
the settings of `slurm submit`'s generate and probe jobs, the chunk probe and `tribunal score`
(which need the store's tokenizer from traces/).

The one module that chains the steps (problems -> traces -> store -> probes -> report); the steps never
import each other backwards. Every option is checked before anything is created, so bad input leaves nothing
behind.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from pathlib import Path

from .cluster.slurm import PROBE_JOB, SubmitConfig
from .errors import TribunalError
from .problems.halves import question_halves
from .problems.loading import load_problems
from .probes.config import ProbeConfig
from .probes.tokens import MIN_PROBLEMS as MIN_TOKEN_PROBE_PROBLEMS
from .report.exit_report import exit_report
from .report.markdown import EXIT_FOLDER, VALIDATE_FOLDER, write_report
from .report.outputs import chunk_outputs, token_outputs, trajectory_outputs, transfer_outputs
from .steer import NOT_STEER_OPTIONS, SteerConfig, steer
from .store import open_store
from .store.merge import merge_stores
from .traces.generate import run_generation
from .traces.models import EMBEDDED_MODEL, piece_decoder
from .traces.settings import GenerateConfig

STORE_NAME = "store.h5"
EXIT_OPTIONS = ("exit_rule", "exit_threshold", "exit_answer", "exit_answer_budget")  # `run --early-exit`'s policy
RUN_STEER_OPTIONS = ("layer", "alpha", "random_directions", "no_ablation")  # `run --validate`'s steering


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


def run_pipeline(run_dir, options: dict, progress: bool = True, early_exit: bool = False, validate: bool = False,
                 steering: dict | None = None) -> dict:
    """Generate into RUN/store.h5 (resuming), probe it, write RUN/report.md. Returns what each step said.

    options: GenerateConfig and ProbeConfig fields (split_options). All are checked first; the run folder
    appears when the store writer opens, once the model and problems have loaded. early_exit: after the probes,
    sample the same problems and seeds again with RUN itself as the exit policy's probes folder (the exit_*
    options), every trace kept, into RUN/early_exit/store.h5 (outside RUN/*.h5, so RUN still opens as one run),
    and measure it against the first run (report.exit_report) in report.md's "Early exit, measured". validate:
    then ask whether the direction is real (validate_run), in report.md's "Is it real?"; steering: its
    SteerConfig options (RUN_STEER_OPTIONS), which need validate."""
    run = Path(run_dir)
    generate, probe_options = split_options(options)
    policy = exit_options(generate, early_exit)
    config = GenerateConfig(out=str(run / STORE_NAME), progress=progress, **generate).validate()
    probes = asdict(ProbeConfig(**probe_options).validate())
    enough = max(probes["folds"], MIN_TOKEN_PROBE_PROBLEMS)
    if config.max_problems < enough:
        raise TribunalError(f"--max-problems {config.max_problems} cannot fill {probes['folds']} problem-grouped folds "
                            f"and the token probe's held-out problems: give at least {enough}")
    steering = dict(steering or {})
    given = [k for k, v in steering.items() if v != SteerConfig.__dataclass_fields__[k].default]
    if given and not validate:
        raise TribunalError(f"--{given[0].replace('_', '-')} sets the steering of `run --validate`: add --validate")
    SteerConfig(**steering).validate()
    exit_config = None
    if early_exit:  # the monitor is the policy's own (its probes); keep_all: every full trace gets its twin
        exit_config = replace(config, out=str(run / EXIT_FOLDER / STORE_NAME), exit_policy=str(run), monitor=None,
                              keep_all=True, **policy).validate()
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
    chunks, measured = None, None
    result.update(trajectory=traj["summary"], tokens=tok["summary"])
    try:
        deer = trial_answer_rows(store, config.model or str(EMBEDDED_MODEL), decoder, None, progress,
                                 **{k: getattr(config, k) for k in ("revision", "compute_dtype", "device_map",
                                                                   "trust_remote_code")})
        chunks = chunk_outputs(store, run, decoder, progress=progress, **deer, **probes)
        result["chunks"] = chunks["summary"]
    except TribunalError as exc:  # with --early-exit the report still says what the other probes found
        if exit_config is None:
            raise
        result["chunks"] = f"chunk probe: not run: {exc}"
        measured = {"not_measured": f"the chunk probe did not run ({exc}), so there is no chunk direction and no "
                                    "threshold to exit with"}
    if exit_config is not None and chunks is not None:
        # the problems the first run tried, no more: each of its traces has a twin, and nothing else is sampled
        exit_config = replace(exit_config, max_problems=gen["problems_tried"])
        try:
            exit_gen = run_generation(exit_config)
            result["exit_generate"] = exit_gen
            if exit_gen["status"] != "done":
                return result
            measured = exit_report(store, [exit_config.out], run / EXIT_FOLDER, decoder)
        except TribunalError as exc:
            measured = {"not_measured": f"the run with the exit policy failed: {exc}"}
    if measured is not None:
        result["early_exit"] = measured.get("summary") or f"early exit: not measured: {measured['not_measured']}"
    validation = validate_run(run, store, config, gen, decoder, probes, steering, progress) if validate else None
    if validation is not None:
        result["validation"] = validation
        if validation.get("status") == "interrupted":
            return result
    write_report(run / "report.md", gen, traj, tok, time.time() - started, chunks, exit_measured=measured,
                 validation=validation)
    return result


def validate_run(run: Path, store: Path, config: GenerateConfig, gen: dict, decoder, probes: dict, steering: dict,
                 progress: bool) -> dict:
    """`run --validate`: is the direction real? (1) transfer: the run's problems split into short and long
    questions (problems.halves), each half's traces copied into a store of its own (VALIDATE_FOLDER/halves/), every
    probe fit on one half and scored on the other, both ways; (2) steering (tribunal steer with its defaults, RUN as
    the probes folder) over the problems the run tried, with the run's generator options and seed. A step that
    cannot run says why in the report instead of stopping it. steering: SteerConfig options."""
    folder = run / VALIDATE_FOLDER
    out = {"transfer": [], "steering": None, "notes": []}
    with open_store(store) as opened:
        stored = set(opened.table["problem_id"].tolist())
    problems = [p for p in load_problems(config.dataset, config.split) if p.problem_id in stored]
    try:
        halves = question_halves(problems)
    except TribunalError as exc:
        out["notes"].append(f"transfer not measured: {exc}")
        halves = []
    for name, ids, description in halves:
        merge_stores(store, folder / "halves" / f"{name}.h5", progress=progress, problems=ids, subset=description)
    for (a, _, a_is), (b, _, b_is) in (halves, halves[::-1]) if halves else ():
        where = folder / f"transfer_{a}_to_{b}"
        try:
            measured = transfer_outputs([folder / "halves" / f"{a}.h5"], [folder / "halves" / f"{b}.h5"], where,
                                        decoder, progress=progress, **probes)
            out["transfer"].append({"train": a_is, "test": b_is, "folder": f"{VALIDATE_FOLDER}/{where.name}",
                                    "rows": measured["rows"], "summary": measured["summary"]})
        except TribunalError as exc:
            out["notes"].append(f"transfer from the {a} half to the {b} half not measured: {exc}")
    generator = {f.name for f in GenerateConfig.cli_fields()} - set(NOT_STEER_OPTIONS)
    options = {k: v for k, v in asdict(config).items() if k in generator} | {"max_problems": gen["problems_tried"]}
    try:
        steered = steer(run, folder / "steering", options, progress=progress, **steering)
    except TribunalError as exc:
        out["notes"].append(f"steering not measured: {exc}")
        return out
    if steered["status"] != "done":
        return {**out, "status": "interrupted"}
    out["steering"] = {k: steered[k] for k in ("sentences", "summary", "layer", "sigma", "specificity", "headline_alpha")
                       if k in steered} | {"folder": f"{VALIDATE_FOLDER}/steering"}
    return out


def exit_options(generate: dict, early_exit: bool) -> dict:
    """Take `run --early-exit`'s policy options (EXIT_OPTIONS) out of the first run's generator options. The
    policy's probes are the run's own, so `run` takes no --exit-policy; the exit_* options need --early-exit."""
    if generate.pop("exit_policy", None):
        raise TribunalError("`tribunal run` takes no --exit-policy: `run --early-exit` exits with the run folder's own "
                            "probes; for another probes folder use `tribunal generate --exit-policy DIR` and "
                            "`tribunal exit-report`")
    policy = {k: generate.pop(k) for k in EXIT_OPTIONS if k in generate}
    defaults = GenerateConfig.__dataclass_fields__
    given = [k for k, v in policy.items() if v != defaults[k].default]
    if given and not early_exit:
        raise TribunalError(f"--{given[0].replace('_', '-')} sets the policy of `run --early-exit`: add --early-exit")
    return policy


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
