"""The `tribunal` command: thin click commands over library functions.

This is the only module that imports click. Every command calls a function
that tests can call directly; a TribunalError becomes a one-line message and
exit status 1.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .config import parse_budget, parse_index_list, parse_size
from .errors import TribunalError
from .traces.settings import COMPUTE_DTYPE_CHOICES


def show_progress_log():
    """The library logs resumes, repairs and OOM retries; show them on stderr."""
    import logging

    logging.basicConfig(level=logging.INFO, format="[tribunal %(asctime)s] %(message)s", datefmt="%H:%M:%S")


def user_errors(func):
    """Turn TribunalError into a one-line click error (exit 1); anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TribunalError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def parsed(parse):
    """A click callback that reads an option's text with a library parser (tribunal/config.py); its ValueError
    becomes a one-line parameter error. An option not given (None) stays None."""

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def field_options(fields, flags=lambda f: ("--" + f.name.replace("_", "-"),)) -> list:
    """click options derived from dataclass fields (GenerateConfig, ProbeConfig, SynthSettings: one definition
    each): help, default, type and choices come from the field; a tuple default shows as its comma list."""
    types = {"int": int, "float": float}
    options = []
    for f in fields:
        meta, names = f.metadata, (*flags(f), f.name)
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kwargs = dict(default=default, help=meta["help"], show_default=default is not None and default is not False)
        if f.type == "bool":
            options.append(click.option(*names, is_flag=True, help=meta["help"]))
        elif "secondary" in meta:
            options.append(click.option(f"{names[0]}/{meta['secondary']}", f.name, default=default, help=meta["help"]))
        elif "choices" in meta:
            options.append(click.option(*names, type=click.Choice(meta["choices"]), **kwargs))
        else:
            options.append(click.option(*names, type=types.get(f.type.split(" ")[0], str), **kwargs))
    return options


def with_options(func, options: list):
    """Apply click options so that --help lists them in the given order."""
    for option in reversed(options):
        func = option(func)
    return func


def config_option():
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=load_config_file,
                        is_eager=True, expose_value=False,
                        help="YAML or TOML file with these options' keys; the command line wins.")


def quiet_option():
    return click.option("--quiet", is_flag=True, help="No progress bar.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tribunal")
def main():
    """tribunal: do a reasoning model's activations know whether its chain of thought is going right?

    problems -> traces (generate) -> store (inspect, verify, merge) -> probes (probe, score) -> report (run).
    """


# -- store -------------------------------------------------------------------------------------


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--trace", "trace_index", type=int, default=None, help="Show one trace (global index): text, label, log-probs.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--tokenizer", default=None,
              help="Tokenizer (path or hub id) to show --trace tokens as text; default: the store's model when local.")
@user_errors
def inspect(stores, trace_index, as_json, tokenizer):
    """Summarize STORES (files, globs or a run folder), also while a writer is running."""
    from .store import open_store
    from .store.summary import format_summary, format_trace, summarize
    from .traces.models import token_decoder

    with open_store(stores) as store:
        if trace_index is not None:
            click.echo(format_trace(store, trace_index, decode=token_decoder(store.model_id, tokenizer)))
            return
        info = summarize(store)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else format_summary(info))


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--no-values", is_flag=True, help="Skip the NaN/Inf scan of the activations (fast).")
@user_errors
def verify(stores, no_values):
    """Check every invariant of STORES; exit 0 when all hold, 1 with the list of problems otherwise."""
    from .store.verify import verify_files

    result = verify_files(stores, check_values=not no_values)
    if result["problems"]:
        for p in result["problems"]:
            click.echo(f"FAIL {p}", err=True)
        click.echo(f"{len(result['problems'])} problem(s) in {result['files']} file(s)", err=True)
        sys.exit(1)
    click.echo(f"OK: {result['traces']} traces, {result['tokens']} tokens in {result['files']} file(s); "
               "all invariants hold")


def synth_options(func):
    """`synth`'s options, derived from SynthSettings (one definition), plus --quiet."""
    from .traces.synthetic import SynthSettings

    return with_options(func, [*field_options(SynthSettings.cli_fields()), quiet_option()])


@main.command()
@click.argument("out")
@synth_options
@user_errors
def synth(out, quiet, **settings):
    """Write a store of synthetic traces with a planted truth to OUT (resumes an interrupted OUT)."""
    from .traces.synthetic import SynthSettings, write_synthetic_store

    result = write_synthetic_store(out, SynthSettings(**settings), progress=not quiet)
    click.echo(f"wrote {out}: {result['traces']} traces, {result['tokens']} tokens"
               + (f" (resumed after {result['resumed_from']})" if result["resumed_from"] else ""))


# -- traces ------------------------------------------------------------------------------------


def load_config_file(ctx, param, value):
    """--config FILE (YAML or TOML, same keys as the options): its values become defaults; the command line wins."""
    if not value:
        return value
    from .config import read_config

    try:
        values = read_config(value)
    except Exception as exc:
        raise click.BadParameter(str(exc)) from None
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(values) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown key(s) {unknown}; use the option names, e.g. max_new_tokens")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def generator_options(func, per_shard: bool = True, leave_out: tuple[str, ...] = ()):
    """The generator's options, derived from GenerateConfig (one definition), plus --config and --quiet.
    per_shard=False leaves out what the cluster launcher sets per task (--shard); leave_out: fields by name."""
    from .traces.settings import GenerateConfig

    fields = [f for f in GenerateConfig.cli_fields()
              if (per_shard or not f.metadata.get("per_shard")) and f.name not in leave_out]
    return with_options(func, [config_option(), *field_options(fields), quiet_option()])


def cluster_generator_options(func):
    return generator_options(func, per_shard=False)


def run_generator_options(func):
    """`run`'s: no --exit-policy, since `run --early-exit` exits with the run folder's own probes."""
    return generator_options(func, leave_out=("exit_policy",))


def run_steer_options(func):
    """`run --validate`'s steering: SteerConfig's options (one definition) that `run` takes."""
    from .pipeline import RUN_STEER_OPTIONS
    from .steer import SteerConfig

    return with_options(func, field_options([f for f in SteerConfig.cli_fields() if f.name in RUN_STEER_OPTIONS]))


def probe_options(*probes: str, beside_generator: bool = False):
    """The options of these probes, derived from ProbeConfig (one definition), plus --config and --quiet.
    beside_generator: for commands that also take the generator's options (run, slurm submit), which bring
    --config and --quiet, and whose --seed seeds the sampling and the probes alike."""
    from .probes.config import ProbeConfig
    from .traces.settings import GenerateConfig

    generator = {f.name for f in GenerateConfig.cli_fields()} if beside_generator else set()
    options = field_options([f for f in ProbeConfig.cli_fields(*probes) if f.name not in generator
                             and not (beside_generator and f.metadata.get("given_stores"))], ProbeConfig.flags)

    def decorate(func):
        return with_options(func, options if beside_generator else [config_option(), *options, quiet_option()])

    return decorate


@main.command()
@click.option("--out", required=True, help="Store file to write (resumed if it exists).")
@generator_options
@user_errors
def generate(quiet, **options):
    """Sample and grade traces; stream per-token activations of the target layers into --out.

    Exit codes: 0 done, 1 failed, 75 interrupted by SIGUSR1/SIGTERM/SIGINT (store closed; rerun to resume).
    """
    from .traces.generate import EXIT_INTERRUPTED, GenerateConfig, format_summary, run_generation

    show_progress_log()
    summary = run_generation(GenerateConfig(progress=not quiet, **options))
    click.echo(format_summary(summary))
    if summary["status"] == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


@main.command()
@click.option("--out", required=True, help="Run folder: store.h5, directions, plots, report.md.")
@click.option("--early-exit", is_flag=True,
              help="Then sample the same problems and seeds again with the run's own probes as the exit policy "
                   "(--exit-rule, --exit-threshold, --exit-answer), into OUT/early_exit/, and measure the tokens "
                   "saved and the accuracy change against the first run in report.md.")
@click.option("--validate", is_flag=True,
              help="Then ask whether the direction is real: transfer between the short- and long-question halves "
                   "of the run's problems, both ways, and `tribunal steer` with its defaults (the direction against "
                   "random ones), into OUT/validate/ and report.md's \"Is it real?\".")
@run_generator_options
@probe_options(beside_generator=True)
@run_steer_options
@user_errors
def run(out, early_exit, validate, quiet, **options):
    """The main job: generate (the embedded default when no model is given), the probes, report.md, in OUT.

    --seed seeds the sampling and every probe. Rerunning resumes the generation. Exit 75 when interrupted
    (rerun to resume).
    """
    from .pipeline import run_pipeline
    from .traces.generate import EXIT_INTERRUPTED, format_summary

    from .pipeline import RUN_STEER_OPTIONS

    steering = {k: options.pop(k) for k in RUN_STEER_OPTIONS}
    result = run_pipeline(out, options, progress=not quiet, early_exit=early_exit, validate=validate, steering=steering)
    click.echo(format_summary(result["generate"]))
    if result["generate"]["status"] != "done":
        sys.exit(EXIT_INTERRUPTED)
    click.echo(result["trajectory"])
    click.echo(result["tokens"])
    click.echo(result["chunks"])
    if "exit_generate" in result:
        click.echo(format_summary(result["exit_generate"]))
        if result["exit_generate"]["status"] != "done":
            sys.exit(EXIT_INTERRUPTED)
    if "early_exit" in result:
        click.echo(result["early_exit"])
    if "validation" in result:
        if result["validation"].get("status") == "interrupted":
            sys.exit(EXIT_INTERRUPTED)
        for part in result["validation"]["transfer"]:
            click.echo(part["summary"])
        if result["validation"]["steering"]:
            click.echo(result["validation"]["steering"]["summary"])
        for note in result["validation"]["notes"]:
            click.echo(note)
    click.echo(f"report: {out}/report.md")


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, help="Store to write (an interrupted capture resumes).")
@click.option("--layers", default=None, help="Layers to capture: 4,8,12-15 or all (default: the source's layers).")
@click.option("--model", default=None, help="The model that sampled the traces (default: the store's, when local).")
@click.option("--capture-memory", default="auto", show_default=True,
              callback=parsed(parse_budget),
              help="Memory of a forward batch at most (its activations and working set), e.g. 4G; auto: half of the "
                   "device's free memory, 2G on a CPU.")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPE_CHOICES), default="auto", show_default=True)
@click.option("--device-map", default=None)
@click.option("--quiet", is_flag=True)
@user_errors
def capture(sources, out, layers, model, capture_memory, compute_dtype, device_map, quiet):
    """Re-forward the stored traces of SOURCES through the model (teacher forcing) into a new store with the same
    traces, labels and tokens and the requested layers: add layers without resampling. Exit 75 when interrupted."""
    from .traces.capture.recapture import recapture_store
    from .traces.stop import EXIT_INTERRUPTED

    show_progress_log()
    result = recapture_store(sources, out, model=model, layers=layers, capture_memory=capture_memory,
                           compute_dtype=compute_dtype, device_map=device_map, progress=not quiet)
    click.echo(f"{result['status']}: {out}: {result['traces']} traces, {result['tokens']} tokens, "
               f"layers {result['layers']}")
    if result["status"] != "done":
        sys.exit(EXIT_INTERRUPTED)


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Merged store file to write (an interrupted merge resumes).")
@click.option("--memory", default="256M", show_default=True, callback=parsed(parse_size),
              help="Memory for the traces copied in one batch, e.g. 1G.")
@click.option("--quiet", is_flag=True)
@user_errors
def merge(shards, out, memory, quiet):
    """Copy the committed traces of SHARDS (files or globs) into one self-contained store."""
    from .store.merge import merge_stores

    result = merge_stores(shards, out, progress=not quiet, memory_bytes=memory)
    click.echo(f"merged {result['shards']} shards into {out}: {result['traces']} traces, {result['tokens']} tokens")


# -- cluster -----------------------------------------------------------------------------------


@main.group()
def slurm():
    """Run the generator as an sbatch array (one shard per task) and the probes after it."""


@slurm.command("submit")
@click.option("--run-dir", required=True, help="Run folder: shards, logs, filled sbatch scripts, probes.")
@click.option("--shards", default=4, show_default=True, help="Array tasks (one store shard each).")
@cluster_generator_options
@probe_options("trajectory", "tokens", "chunks", beside_generator=True)
@click.option("--time", "time_limit", default="04:00:00", show_default=True, help="Per-task time limit.")
@click.option("--partition", default=None)
@click.option("--gpus", default=1, show_default=True, help="GPUs per task (0 for CPU).")
@click.option("--cpus", default=4, show_default=True)
@click.option("--mem", default=None, help="Memory per task, e.g. 64G.")
@click.option("--setup", multiple=True, help="A shell line to run first (module load ..., source venv/bin/activate).")
@click.option("--python", default=None,
              help="Python that runs tribunal in the job (default: python3 from --setup's environment, else this one).")
@click.option("--max-requeues", default=5, show_default=True)
@click.option("--probe-time", default="02:00:00", show_default=True)
@click.option("--generate-arg", "generate_args", multiple=True, help="Extra `tribunal generate` argument (repeat).")
@click.option("--probe-arg", "probe_args", multiple=True, help="Extra `tribunal probe trajectory` argument (repeat).")
@click.option("--submit", "do_submit", is_flag=True, help="Submit both jobs (else only print the commands).")
@user_errors
def slurm_submit(run_dir, shards, time_limit, partition, gpus, cpus, mem, setup, python, max_requeues, probe_time,
                 generate_args, probe_args, do_submit, quiet, **options):
    """Fill slurm/generate.sbatch and slurm/probe.sbatch into RUN/slurm/, print the sbatch commands, optionally submit.

    Every `tribunal generate` option is accepted here and passed to each array task; the probe options go to the
    probe job (--seed to both)."""
    from .cluster.slurm import commands, submit, write_scripts
    from .pipeline import submit_config

    cfg = submit_config(run_dir, options, probe_args, shards=shards, time=time_limit, partition=partition, gpus=gpus,
                        cpus=cpus, mem=mem, setup=list(setup), python=python, max_requeues=max_requeues,
                        probe_time=probe_time, generate_args=list(generate_args))
    gen, probe_script = write_scripts(cfg)
    for line in commands(gen, probe_script):
        click.echo(line)
    if do_submit:
        jobs = submit(gen, probe_script)
        click.echo(f"submitted: generate array {jobs['generate']}, probe {jobs['probe']} (after the array succeeds)")


@slurm.command("status")
@click.argument("run_dir")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def slurm_status(run_dir, as_json):
    """A table of RUN_DIR's shards: traces by label, tokens, size, live writer, requeues, queue state."""
    from .cluster.slurm import format_status, shard_status

    rows = shard_status(run_dir)
    click.echo(json.dumps(rows, indent=1) if as_json else format_status(rows))


# -- probes ------------------------------------------------------------------------------------


@main.group()
def probe():
    """Fit and evaluate probes on stores (trajectory-level, per-token, per-chunk)."""


@probe.command("trajectory")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder.")
@click.option("--layers", default=None, callback=parsed(parse_index_list),
              help="Layers to probe (default: every stored layer).")
@probe_options("trajectory")
@user_errors
def probe_trajectory_cmd(stores, out_dir, layers, quiet, **options):
    """Trajectory probes for every stored layer x aggregation, with baselines, CIs and nested selection."""
    from .report.outputs import trajectory_outputs

    result = trajectory_outputs(stores, out_dir, layers=layers, progress=not quiet, **options)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/implicit_value_directions.json, metrics.csv, probe_results.png")


@probe.command("tokens")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder.")
@click.option("--layer", type=int, default=None, help="Layer (default: the middle stored layer).")
@probe_options("tokens")
@user_errors
def probe_tokens_cmd(stores, out_dir, layer, quiet, **options):
    """Per-token probe fit out of core (LDA and mass-mean), evaluated on held-out problems by position."""
    from .report.outputs import token_outputs

    result = token_outputs(stores, out_dir, layer=layer, progress=not quiet, **options)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/implicit_value_directions.json, token_probe.png")


@probe.command("chunks")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder.")
@click.option("--tokenizer", default=None,
              help="Tokenizer (path or hub id) to find chunk ends in the stored tokens; default: the store's model.")
@click.option("--cues", default=None, help="Comma list of reflection cues that open a chunk (default: wait, hmm, ...).")
@click.option("--chunk-regex", default=None, help="An extra regex; a chunk also ends where it matches.")
@click.option("--model", default=None,
              help="The stores' model (path or hub id): adds DEER's trial-answer exit rule to the baselines.")
@probe_options("chunks")
@user_errors
def probe_chunks_cmd(stores, out_dir, tokenizer, cues, chunk_regex, model, quiet, **options):
    """Probe every reasoning chunk's end for whether its intermediate answer is right; simulate early exit."""
    from .pipeline import chunk_probe

    result = chunk_probe(stores, out_dir, tokenizer, cues, chunk_regex, model, progress=not quiet, **options)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/chunks.csv, chunk_metrics.json, chunk_probe.png, early_exit.png")


@probe.command("transfer")
@click.option("--train", multiple=True, required=True,
              help="Store the probes are fit on: a file, a glob or a run folder; repeat for several.")
@click.option("--test", multiple=True, required=True,
              help="Store the probes are scored on (other problems: another dataset, template, temperature); repeat.")
@click.option("--out", "out_dir", required=True, help="Output folder (transfer.json, transfer.csv, transfer.png).")
@click.option("--layers", default=None, callback=parsed(parse_index_list),
              help="Trajectory layers (default: every stored layer).")
@click.option("--token-layer", type=int, default=None, help="Token probe layer (default: the middle stored layer).")
@click.option("--tokenizer", default=None,
              help="Tokenizer (path or hub id) to find chunk ends; default: the stores' model.")
@click.option("--no-chunks", is_flag=True, help="Leave the chunk probe out (no tokenizer needed).")
@probe_options("trajectory", "tokens")
@user_errors
def probe_transfer_cmd(train, test, out_dir, layers, token_layer, tokenizer, no_chunks, quiet, **options):
    """Fit every probe kind on the --train stores and score it on the --test stores, beside its in-distribution
    figure and the baselines refit the same way; stores of another model, layer set or width are refused."""
    from .report.outputs import transfer_outputs
    from .store import open_store
    from .traces.models import piece_decoder

    decode = None
    if not no_chunks:
        with open_store(train[0]) as store:
            decode = piece_decoder(store.model_id, tokenizer)
    result = transfer_outputs(list(train), list(test), out_dir, decode, layers=layers, token_layer=token_layer,
                              progress=not quiet, **options)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/transfer.json, transfer.csv, transfer.png")


@main.command()
@click.argument("directions")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_csv", required=True, help="CSV of per-token (or, with --chunks, per-chunk) logits.")
@click.option("--layer", type=int, default=None, help="Cell layer (default: the chosen cell).")
@click.option("--aggregation", default=None, help="Cell aggregation (default: the chosen cell).")
@click.option("--chunks", "chunk_ends", is_flag=True, help="Score each reasoning chunk's end with the chunk direction.")
@click.option("--tokenizer", default=None, help="With --chunks: tokenizer to find chunk ends (default: the store's model).")
@user_errors
def score(directions, stores, out_csv, layer, aggregation, chunk_ends, tokenizer):
    """Project stored traces onto saved DIRECTIONS (a .json or its folder): per-token probe logits to a CSV, or
    with --chunks the chunk direction's logit at every chunk end (the online monitor)."""
    from .pipeline import score_stores

    result = score_stores(directions, stores, out_csv, layer, aggregation, chunk_ends, tokenizer)
    if chunk_ends:
        click.echo(f"scored {result['chunks']} chunk ends at layer {result['layer']} (chunk direction): {out_csv}")
    else:
        click.echo(f"scored layer {result['layer']} ({result['aggregation']} direction): {out_csv}")


def steer_options(func):
    """steer's own options (SteerConfig: one definition) and the generator's it takes (not what steer sets)."""
    from .steer import NOT_STEER_OPTIONS, SteerConfig

    return generator_options(with_options(func, field_options(SteerConfig.cli_fields())), leave_out=NOT_STEER_OPTIONS)


@main.command()
@click.argument("probes")
@click.option("--out", "out_dir", required=True,
              help="Output folder: arms/NAME/store.h5 per arm, steering.json, steering.csv, dose_response.png.")
@steer_options
@user_errors
def steer(probes, out_dir, quiet, **options):
    """Steer the model along PROBES' direction (a probes folder): the same pairs and seeds sampled once per arm
    (alpha = 0, each alpha along the direction and along --random-directions random ones, the direction projected
    out) and each arm measured against alpha = 0. Exit 75 when interrupted (rerun to resume)."""
    from .steer import SteerConfig, steer as run_steer
    from .traces.stop import EXIT_INTERRUPTED

    show_progress_log()
    own = {f.name for f in SteerConfig.cli_fields()}
    result = run_steer(probes, out_dir, {k: v for k, v in options.items() if k not in own}, progress=not quiet,
                       **{k: v for k, v in options.items() if k in own})
    if result["status"] != "done":
        click.echo(f"interrupted in arm {result['arm']}; rerun the same command to resume")
        sys.exit(EXIT_INTERRUPTED)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/steering.json, steering.csv and dose_response.png ({len(result['arm_names'])} arms)")


# -- report ------------------------------------------------------------------------------------


@main.command("exit-report")
@click.argument("full")
@click.argument("exited", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder (exit_report.json, exit_report.md, a plot per rule).")
@click.option("--probes", default=None, help="Probes folder to simulate the probe rule with (default: the policy's).")
@click.option("--tokenizer", default=None, help="Tokenizer to find FULL's chunk ends (default: the store's model).")
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Problem-bootstrap resamples of the measured CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@user_errors
def exit_report_cmd(full, exited, out_dir, probes, tokenizer, resamples, seed):
    """Early exit measured: pair each (problem, sample) of FULL (a run without exit) with each EXITED run (same
    settings and seeds, one --exit-policy each); tokens saved and accuracy change with problem-bootstrap CIs,
    beside the offline simulation of the same policy on FULL."""
    from .report.exit_report import REPORT_MD, exit_report
    from .store import open_store
    from .traces.models import piece_decoder

    with open_store(full) as store:
        model_id = store.model_id
    result = exit_report(full, list(exited), out_dir, piece_decoder(model_id, tokenizer), probes=probes,
                         resamples=resamples, seed=seed)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/exit_report.json, {REPORT_MD} and a plot per rule")


if __name__ == "__main__":
    main()
