"""SLURM array runs: fill the sbatch templates, submit generate + probe with a dependency, report shard status.

The templates and the batch-side task script (forwards signals, requeues) ship inside the package
(`tribunal/cluster/templates/`; the top-level `slurm/` and `bin/` link to them), so `submit` works from an
installed wheel. This module only fills and submits them: every filled file, the task script included, lands
in RUN/slurm/, so a run can also be launched by hand (`cd RUN && sbatch slurm/generate.sbatch`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TribunalError

TEMPLATES = Path(__file__).resolve().parent / "templates"
TASK_SCRIPT = TEMPLATES / "tribunal-task"
PROBE_JOB = ("trajectory", "tokens", "chunks")  # the probes that probe.sbatch runs, in order
SIGNAL_LEAD_S = 300  # sbatch --signal=B:USR1@300: the stop signal comes this long before the time limit


@dataclass
class SubmitConfig:
    run_dir: str
    shards: int = 4
    generate: dict = field(default_factory=dict)  # `tribunal generate` options (GenerateConfig names) for every task
    time: str = "04:00:00"
    partition: str | None = None
    gpus: int = 1
    cpus: int = 4
    mem: str | None = None
    setup: list = field(default_factory=list)
    python: str | None = None
    max_requeues: int = 5
    probe_time: str = "02:00:00"
    generate_args: list = field(default_factory=list)
    probe_args: dict = field(default_factory=dict)  # probe (trajectory, tokens, chunks) -> its arguments in the probe job


def _site_lines(cfg: SubmitConfig, gpus: int, mem: str | None) -> str:
    lines = []
    if cfg.partition:
        lines.append(f"#SBATCH --partition={cfg.partition}")
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    lines.append(f"#SBATCH --cpus-per-task={cfg.cpus}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    return "\n".join(lines)


def generate_arguments(cfg: SubmitConfig) -> list[str]:
    """The `tribunal generate` arguments every task gets: the options that differ from their defaults, then extras.
    The options are checked here, before any file is written."""
    from ..traces.settings import GenerateConfig

    unknown = sorted(set(cfg.generate) - {f.name for f in GenerateConfig.cli_fields()})
    if unknown:
        raise TribunalError(f"unknown generate option(s) {unknown}")
    GenerateConfig(out="shard.h5", **cfg.generate).validate()
    return GenerateConfig.arguments(cfg.generate) + [str(a) for a in cfg.generate_args]


def fill(template: str, values: dict) -> str:
    """Replace every @@NAME@@; refuse to leave one unfilled."""
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", str(value))
    if "@@" in template:
        left = sorted({part.split("@@")[0] for part in template.split("@@")[1::2]})
        raise TribunalError(f"template placeholders left unfilled: {left}")
    return template


def time_limit_seconds(text: str) -> int:
    """Seconds of a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise TribunalError(f"--time {text!r}: use a SLURM time such as 04:00:00, 90 (minutes) or 1-12:00:00")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60


def _local_paths_absolute(cfg: SubmitConfig) -> None:
    """A task runs in another working directory: local model and dataset paths are made absolute here."""
    for name in ("model", "dataset"):
        value = cfg.generate.get(name)
        if value and Path(value).exists():
            cfg.generate[name] = str(Path(value).resolve())


def write_scripts(cfg: SubmitConfig) -> tuple[Path, Path]:
    """Filled RUN/slurm/generate.sbatch and RUN/slurm/probe.sbatch, with the task script beside them; creates RUN/logs."""
    if cfg.shards < 1:
        raise TribunalError(f"--shards must be at least 1, got {cfg.shards}")
    seconds = time_limit_seconds(cfg.time)
    if seconds <= SIGNAL_LEAD_S:
        raise TribunalError(
            f"--time {cfg.time} ({seconds} s) is not longer than the stop signal's lead (--signal=B:USR1@{SIGNAL_LEAD_S}, "
            f"{SIGNAL_LEAD_S} s before the limit): the task would be told to stop before it starts; give more than "
            f"{SIGNAL_LEAD_S // 60} minutes")
    time_limit_seconds(cfg.probe_time)
    _local_paths_absolute(cfg)
    generate_args = generate_arguments(cfg)
    run = Path(cfg.run_dir).resolve()
    (run / "slurm").mkdir(parents=True, exist_ok=True)
    (run / "logs").mkdir(exist_ok=True)
    task = run / "slurm" / "tribunal-task"
    shutil.copyfile(TASK_SCRIPT, task)
    task.chmod(0o755)
    # With --setup lines the job runs the python they put first on PATH (the user's venv or conda env);
    # without, the interpreter that ran `submit`.
    python = cfg.python or ("python3" if cfg.setup else sys.executable)
    common = {"RUN_DIR": shlex.quote(str(run)), "SETUP": "\n".join(cfg.setup) or "# (none)",
              "PYTHON": shlex.quote(python)}
    gen = fill((TEMPLATES / "generate.sbatch").read_text(), {
        **common, "SITE_SBATCH": _site_lines(cfg, cfg.gpus, cfg.mem), "TIME": cfg.time, "SIGNAL_LEAD": SIGNAL_LEAD_S,
        "LAST_SHARD": cfg.shards - 1, "SHARDS": cfg.shards, "MAX_REQUEUES": cfg.max_requeues,
        "GENERATE_ARGS": " ".join(shlex.quote(a) for a in generate_args),
    })
    probe = fill((TEMPLATES / "probe.sbatch").read_text(), {
        **common, "SITE_SBATCH_PROBE": _site_lines(cfg, 0, cfg.mem), "PROBE_TIME": cfg.probe_time,
        **{f"{probe.upper()}_ARGS": " ".join(shlex.quote(str(a)) for a in cfg.probe_args.get(probe, []))
           for probe in PROBE_JOB},
    })
    gen_path, probe_path = run / "slurm" / "generate.sbatch", run / "slurm" / "probe.sbatch"
    gen_path.write_text(gen)
    probe_path.write_text(probe)
    (run / "slurm" / "submit.json").write_text(json.dumps({k: v for k, v in vars(cfg).items()}, indent=1, default=str))
    return gen_path, probe_path


def commands(gen_path: Path, probe_path: Path) -> list[str]:
    """The exact shell commands that submit both jobs from the run folder, the probe after the whole array succeeded."""
    run = gen_path.parent.parent
    return [
        f"cd {shlex.quote(str(run))}",
        f"GEN=$(sbatch --parsable {shlex.quote(str(gen_path.relative_to(run)))})",
        f"sbatch --parsable --dependency=afterok:$GEN {shlex.quote(str(probe_path.relative_to(run)))}",
    ]


def _sbatch(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise TribunalError("sbatch not found: submit from a SLURM login node, or run the printed commands there") from None
    if done.returncode != 0:
        raise TribunalError(f"sbatch failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return done.stdout.strip().split(";")[0]


def submit(gen_path: Path, probe_path: Path) -> dict:
    """Submit from the run folder (the templates' log paths are relative to it)."""
    run = gen_path.parent.parent
    gen = _sbatch([str(gen_path.relative_to(run))], run)
    probe = _sbatch([f"--dependency=afterok:{gen}", str(probe_path.relative_to(run))], run)
    jobs = {"generate": gen, "probe": probe}
    (gen_path.parent / "jobs.json").write_text(json.dumps(jobs))
    return jobs


def squeue_states(job_id: str) -> dict[int, str]:
    """Array task -> state (PENDING, RUNNING, ...) from squeue; empty when squeue is unavailable or done."""
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%i|%T|%R"], capture_output=True,
                              text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in done.stdout.splitlines():
        ident, state, reason = (line.split("|") + ["", ""])[:3]
        if "_" in ident:
            task = ident.split("_", 1)[1]
            if task.isdigit():
                states[int(task)] = state if state != "PENDING" else f"PENDING ({reason})"
    return states


def shard_status(run_dir) -> list[dict]:
    """One row per shard: traces by label, tokens, size, live writer, requeues, queue state."""
    from ..store import open_store
    from ..store.lock import writer_is_live

    run = Path(run_dir)
    cfg_path = run / "slurm" / "submit.json"
    n = json.loads(cfg_path.read_text())["shards"] if cfg_path.exists() else len(list(run.glob("shard_*.h5")))
    jobs_path = run / "slurm" / "jobs.json"
    states = squeue_states(json.loads(jobs_path.read_text())["generate"]) if jobs_path.exists() else {}
    rows = []
    for i in range(n):
        path = run / f"shard_{i:03d}.h5"
        req = run / "requeues" / f"task_{i}"
        row = {"shard": i, "path": str(path), "exists": path.exists(), "traces": 0, "correct": 0, "incorrect": 0,
               "unparsed": 0, "tokens": 0, "size_bytes": 0, "writer_live": False,
               "requeues": len(req.read_text().splitlines()) if req.exists() else 0, "queue": states.get(i, "-")}
        if path.exists() and path.stat().st_size > 0:
            try:
                with open_store(path) as store:
                    labels = store.labels.tolist()
                    row.update(traces=store.n_traces, tokens=store.n_tokens,
                               **{k: labels.count(k) for k in ("correct", "incorrect", "unparsed")})
            except TribunalError as exc:
                row["error"] = str(exc)
            row["size_bytes"] = path.stat().st_size
            row["writer_live"] = writer_is_live(path)
        rows.append(row)
    return rows


def format_status(rows: list[dict]) -> str:
    head = ["shard", "traces", "correct", "incorrect", "unparsed", "tokens", "size MB", "writer", "requeues", "queue"]
    lines = [head]
    for r in rows:
        lines.append([str(r["shard"]), str(r["traces"]), str(r["correct"]), str(r["incorrect"]), str(r["unparsed"]),
                      str(r["tokens"]), f"{r['size_bytes'] / 1e6:.1f}", "live" if r["writer_live"] else "-",
                      str(r["requeues"]), r["queue"] if "error" not in r else f"ERROR {r['error']}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)
