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
from .errors import TribunalError


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


def parse_int_list(text: str) -> list[int]:
    """'4,8,12-15' -> [4, 8, 12, 13, 14, 15], as a click parameter error when malformed."""
    from .config import parse_index_list

    try:
        return parse_index_list(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_range(text: str) -> tuple[int, int]:
    """'64-256' -> (64, 256); '100' -> (100, 100)."""
    try:
        if "-" in text:
            lo, hi = text.split("-", 1)
            return int(lo), int(hi)
        return int(text), int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a range like 64-256") from None


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

    with open_store(stores) as store:
        if trace_index is not None:
            click.echo(format_trace(store, trace_index, decode=token_decoder(tokenizer, store.model_id)))
            return
        info = summarize(store)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else format_summary(info))


def token_decoder(tokenizer: str | None, model_id: str):
    """token id -> text with the given tokenizer, or the store model's when it is on this machine; else None."""
    from pathlib import Path

    from .traces.models import EMBEDDED_MODEL, EMBEDDED_MODEL_ID

    source = tokenizer or (str(EMBEDDED_MODEL) if model_id == EMBEDDED_MODEL_ID else model_id)
    if tokenizer is None and not Path(source).exists():
        return None  # a hub id: no network lookups unless asked with --tokenizer
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load tokenizer {source!r}: {str(exc).splitlines()[0]}") from None
    return lambda token_id: tok.decode([token_id])


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


@main.command()
@click.argument("out")
@click.option("--traces", default=200, show_default=True, help="Number of traces.")
@click.option("--problems", default=50, show_default=True, help="Number of problems (samples per problem = traces / problems).")
@click.option("--layers", default="4,8,12,16", show_default=True, help="Layer indices, e.g. 4,8,12-16.")
@click.option("--d-model", default=64, show_default=True)
@click.option("--tokens-per-trace", default="64-256", show_default=True, help="Range of trace lengths in tokens.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--signal", default=0.8, show_default=True, help="AUROC of the ideal linear probe on the mean (0.5 = none).")
@click.option("--signal-layers", default=None, help="Layers carrying the signal (default: the middle half).")
@click.option("--length-confound", default=0.0, show_default=True, help="0..1: how much trace length decides the label.")
@click.option("--problem-leak", default=0.0, show_default=True, help="0..1: how much the problem decides the label.")
@click.option("--chunk-signal", type=float, default=None,
              help="Write reasoning chunks with intermediate answers instead; the ideal chunk-end probe's AUROC.")
@click.option("--chunk-position-confound", default=0.0, show_default=True,
              help="0..1: how much a chunk's position decides whether its answer is right.")
@click.option("--quiet", is_flag=True)
@user_errors
def synth(out, traces, problems, layers, d_model, tokens_per_trace, dtype, seed, signal, signal_layers,
          length_confound, problem_leak, chunk_signal, chunk_position_confound, quiet):
    """Write a store of synthetic traces with a planted truth to OUT (resumes an interrupted OUT)."""
    from .traces.synthetic import SynthSettings, write_synthetic_store

    settings = SynthSettings(
        traces=traces, problems=problems, layers=tuple(parse_int_list(layers)), d_model=d_model,
        tokens_per_trace=parse_range(tokens_per_trace), dtype=dtype, seed=seed, signal=signal,
        signal_layers=tuple(parse_int_list(signal_layers)) if signal_layers else None,
        length_confound=length_confound, problem_leak=problem_leak, chunk_signal=chunk_signal,
        chunk_position_confound=chunk_position_confound,
    )
    result = write_synthetic_store(out, settings, progress=not quiet)
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


def generator_options(func, per_shard: bool = True):
    """The generator's options, derived from GenerateConfig (one definition), plus --config and --quiet.
    per_shard=False leaves out what the cluster launcher sets per task (--shard)."""
    from .traces.settings import GenerateConfig

    types = {"int": int, "float": float}
    options = [click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=load_config_file,
                            is_eager=True, expose_value=False,
                            help="YAML or TOML file with these options' keys; the command line wins.")]
    for f in GenerateConfig.cli_fields():
        if f.metadata.get("per_shard") and not per_shard:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        kwargs = dict(default=f.default, help=meta["help"], show_default=f.default not in (None, False))
        if f.type == "bool":
            options.append(click.option(flag, is_flag=True, help=meta["help"]))
        elif "secondary" in meta:
            options.append(click.option(f"{flag}/{meta['secondary']}", default=f.default, help=meta["help"]))
        elif "choices" in meta:
            options.append(click.option(flag, type=click.Choice(meta["choices"]), **kwargs))
        else:
            options.append(click.option(flag, type=types.get(f.type.split(" ")[0], str), **kwargs))
    options.append(click.option("--quiet", is_flag=True, help="No progress bar."))
    for option in reversed(options):
        func = option(func)
    return func


def cluster_generator_options(func):
    return generator_options(func, per_shard=False)


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
@generator_options
@click.option("--folds", default=5, show_default=True, help="Probe CV folds.")
@click.option("--permutations", default=50, show_default=True,
              help="Grouped permutations of the labels (shared by all cells; 0 = skip).")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples of problems.")
@click.option("--memory", default="1G", show_default=True, help="Memory budget of the token probe.")
@user_errors
def run(out, quiet, folds, permutations, n_boot, memory, **options):
    """The main job: generate (the embedded default when no model is given), both probes, report.md, in OUT.

    Rerunning resumes the generation. Exit 75 when interrupted (rerun to resume).
    """
    from .pipeline import run_pipeline

    result = run_pipeline(out, options, {"folds": folds, "permutations": permutations, "n_boot": n_boot,
                                         "memory_bytes": parse_memory(memory)}, progress=not quiet)
    from .traces.generate import EXIT_INTERRUPTED, format_summary

    click.echo(format_summary(result["generate"]))
    if result["generate"]["status"] != "done":
        sys.exit(EXIT_INTERRUPTED)
    click.echo(result["trajectory"])
    click.echo(result["tokens"])
    click.echo(result["chunks"])
    click.echo(f"report: {out}/report.md")


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, help="Store to write (an interrupted capture resumes).")
@click.option("--layers", default=None, help="Layers to capture: 4,8,12-15 or all (default: the source's layers).")
@click.option("--model", default=None, help="The model that sampled the traces (default: the store's, when local).")
@click.option("--capture-memory", default="auto", show_default=True,
              callback=lambda ctx, param, text: parse_budget(text),
              help="Memory of a forward batch at most (its activations and working set), e.g. 4G; auto: half of the "
                   "device's free memory, 2G on a CPU.")
@click.option("--compute-dtype", default="auto", show_default=True)
@click.option("--device-map", default=None)
@click.option("--quiet", is_flag=True)
@user_errors
def capture(sources, out, layers, model, capture_memory, compute_dtype, device_map, quiet):
    """Re-forward the stored traces of SOURCES through the model (teacher forcing) into a new store with the same
    traces, labels and tokens and the requested layers: add layers without resampling. Exit 75 when interrupted."""
    from .traces.capture import capture_store
    from .traces.stop import EXIT_INTERRUPTED

    show_progress_log()
    result = capture_store(sources, out, model=model, layers=layers, capture_memory=capture_memory,
                           compute_dtype=compute_dtype, device_map=device_map, progress=not quiet)
    click.echo(f"{result['status']}: {out}: {result['traces']} traces, {result['tokens']} tokens, "
               f"layers {result['layers']}")
    if result["status"] != "done":
        sys.exit(EXIT_INTERRUPTED)


@main.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Merged store file to write (an interrupted merge resumes).")
@click.option("--memory", default="256M", show_default=True, help="Memory for the traces copied in one batch, e.g. 1G.")
@click.option("--quiet", is_flag=True)
@user_errors
def merge(shards, out, memory, quiet):
    """Copy the committed traces of SHARDS (files or globs) into one self-contained store."""
    from .store.merge import merge_stores

    result = merge_stores(shards, out, progress=not quiet, memory_bytes=parse_memory(memory))
    click.echo(f"merged {result['shards']} shards into {out}: {result['traces']} traces, {result['tokens']} tokens")


# -- cluster -----------------------------------------------------------------------------------


@main.group()
def slurm():
    """Run the generator as an sbatch array (one shard per task) and the probes after it."""


@slurm.command("submit")
@click.option("--run-dir", required=True, help="Run folder: shards, logs, filled sbatch scripts, probes.")
@click.option("--shards", default=4, show_default=True, help="Array tasks (one store shard each).")
@cluster_generator_options
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
@click.option("--probe-memory", default="8G", show_default=True)
@click.option("--generate-arg", "generate_args", multiple=True, help="Extra `tribunal generate` argument (repeat).")
@click.option("--probe-arg", "probe_args", multiple=True, help="Extra `tribunal probe trajectory` argument (repeat).")
@click.option("--submit", "do_submit", is_flag=True, help="Submit both jobs (else only print the commands).")
@user_errors
def slurm_submit(run_dir, shards, time_limit, partition, gpus, cpus, mem, setup, python, max_requeues, probe_time,
                 probe_memory, generate_args, probe_args, do_submit, quiet, **generate):
    """Fill slurm/generate.sbatch and slurm/probe.sbatch into RUN/slurm/, print the sbatch commands, optionally submit.

    Every `tribunal generate` option is accepted here and passed to each array task."""
    from .cluster.slurm import SubmitConfig, commands, submit, write_scripts

    cfg = SubmitConfig(run_dir=run_dir, shards=shards, generate=generate, time=time_limit, partition=partition,
                       gpus=gpus, cpus=cpus, mem=mem, setup=list(setup), python=python, max_requeues=max_requeues,
                       probe_time=probe_time, probe_memory=probe_memory, generate_args=list(generate_args),
                       probe_args=list(probe_args))
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


def parse_memory(text: str) -> int:
    """'512M', '2G', '1073741824' -> bytes."""
    from .config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_budget(text: str) -> int | None:
    """'2G' -> bytes, 'auto' -> None."""
    from . import config

    try:
        return config.parse_budget(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.group()
def probe():
    """Fit and evaluate probes on stores (trajectory-level or per-token)."""


@probe.command("trajectory")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder.")
@click.option("--layers", default=None, help="Layers to probe (default: every stored layer).")
@click.option("--aggregations", default=",".join(("mean", "last", "last_k", "max", "mean_all")), show_default=True)
@click.option("-k", "--last-k", "k", default=10, show_default=True, help="k of the last_k aggregation.")
@click.option("--folds", default=5, show_default=True)
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples of problems.")
@click.option("--permutations", default=50, show_default=True,
              help="Grouped permutations of the labels, shared by all cells (0 = skip).")
@click.option("--seed", default=0, show_default=True)
@click.option("-C", "C", default=1.0, show_default=True, help="Inverse L2 strength of the logistic probe.")
@click.option("--quiet", is_flag=True)
@user_errors
def probe_trajectory_cmd(stores, out_dir, layers, aggregations, k, folds, n_boot, permutations, seed, C, quiet):
    """Trajectory probes for every stored layer x aggregation, with baselines, CIs and nested selection."""
    from .report.outputs import trajectory_outputs

    result = trajectory_outputs(stores, out_dir, layers=parse_int_list(layers) if layers else None,
                                aggregations=tuple(a.strip() for a in aggregations.split(",") if a.strip()), k=k,
                                folds=folds, n_boot=n_boot, permutations=permutations, seed=seed, C=C,
                                progress=not quiet)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/implicit_value_directions.json, metrics.csv, probe_results.png")


@probe.command("tokens")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder.")
@click.option("--layer", type=int, default=None, help="Layer (default: the middle stored layer).")
@click.option("--memory", default="1G", show_default=True, help="Peak memory budget, e.g. 512M; sets the block size.")
@click.option("--test-fraction", default=0.25, show_default=True, help="Share of problems held out.")
@click.option("--bootstrap", "n_boot", default=500, show_default=True)
@click.option("--seed", default=0, show_default=True)
@user_errors
def probe_tokens_cmd(stores, out_dir, layer, memory, test_fraction, n_boot, seed):
    """Per-token probe fit out of core (LDA and mass-mean), evaluated on held-out problems by position."""
    from .report.outputs import token_outputs

    result = token_outputs(stores, out_dir, layer=layer, memory_bytes=parse_memory(memory),
                           test_fraction=test_fraction, seed=seed, n_boot=n_boot)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/implicit_value_directions.json, token_probe.png")


@probe.command("chunks")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder.")
@click.option("--tokenizer", default=None,
              help="Tokenizer (path or hub id) to find chunk ends in the stored tokens; default: the store's model.")
@click.option("--cues", default=None, help="Comma list of reflection cues that open a chunk (default: wait, hmm, ...).")
@click.option("--chunk-regex", default=None, help="An extra regex; a chunk also ends where it matches.")
@click.option("--folds", default=5, show_default=True)
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples of problems.")
@click.option("--permutations", default=50, show_default=True, help="Grouped permutations shared by all layers.")
@click.option("--margin", default=0.02, show_default=True,
              help="Early exit: accuracy the exit rule may lose against the full traces.")
@click.option("--memory", default="1G", show_default=True, help="Memory budget of the store pass.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True)
@user_errors
def probe_chunks_cmd(stores, out_dir, tokenizer, cues, chunk_regex, folds, n_boot, permutations, margin, memory, seed,
                     quiet):
    """Probe every reasoning chunk's end for whether its intermediate answer is right; simulate early exit."""
    from .chunks import DEFAULT_CUES, cue_pattern
    from .report.outputs import chunk_outputs
    from .store import open_store
    from .traces.models import piece_decoder

    with open_store(stores) as store:
        model_id = store.model_id
    pattern = cue_pattern(tuple(c.strip() for c in cues.split(",")) if cues else DEFAULT_CUES, chunk_regex)
    result = chunk_outputs(stores, out_dir, piece_decoder(model_id, tokenizer), folds=folds, n_boot=n_boot,
                           permutations=permutations, seed=seed, margin=margin, pattern=pattern,
                           memory_bytes=parse_memory(memory), progress=not quiet)
    click.echo(result["summary"])
    click.echo(f"wrote {out_dir}/chunks.csv, chunk_metrics.json, chunk_probe.png, early_exit.png")


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
    from .probes import directions as dirs
    from .store import open_store

    doc = dirs.load(directions)
    with open_store(stores) as store:
        if chunk_ends:
            from .probes.chunk_probe import score_chunk_ends
            from .traces.models import piece_decoder

            result = score_chunk_ends(doc, store, piece_decoder(store.model_id, tokenizer), out_csv)
            click.echo(f"scored {result['chunks']} chunk ends at layer {result['layer']} (chunk direction): {out_csv}")
            return
        result = dirs.score_store(doc, store, out_csv, layer, aggregation)
    click.echo(f"scored layer {result['layer']} ({result['aggregation']} direction): {out_csv}")


if __name__ == "__main__":
    main()
