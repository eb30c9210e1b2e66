"""SLURM array runs: fill the sbatch templates, submit generate + probe with a dependency, report shard status.

The templates are `slurm/generate.sbatch` and `slurm/probe.sbatch` in the repository; the batch-side
script that forwards signals and requeues is `bin/tribunal-task`. This module only fills and submits
them, so a run can also be launched by hand from the filled files it writes into RUN/slurm/.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TribunalError

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
BIN_DIR = REPO / "bin"


@dataclass
class SubmitConfig:
    run_dir: str
    shards: int = 4
    model: str | None = None
    dataset: str | None = None
    split: str = "test"
    layers: str | None = None
    target_correct: int = 50
    target_incorrect: int = 50
    max_problems: int = 200
    time: str = "04:00:00"
    partition: str | None = None
    gpus: int = 1
    cpus: int = 4
    mem: str | None = None
    setup: list = field(default_factory=list)
    max_requeues: int = 5
    probe_time: str = "02:00:00"
    probe_memory: str = "8G"
    generate_args: list = field(default_factory=list)
    probe_args: list = field(default_factory=list)


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
    args = []
    for flag, value in (("--model", cfg.model), ("--dataset", cfg.dataset), ("--split", cfg.split),
                        ("--layers", cfg.layers), ("--target-correct", cfg.target_correct),
                        ("--target-incorrect", cfg.target_incorrect), ("--max-problems", cfg.max_problems)):
        if value is not None:
            args += [flag, str(value)]
    return args + [str(a) for a in cfg.generate_args]


def fill(template: str, values: dict) -> str:
    """Replace every @@NAME@@; refuse to leave one unfilled."""
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", str(value))
    if "@@" in template:
        left = sorted({part.split("@@")[0] for part in template.split("@@")[1::2]})
        raise TribunalError(f"template placeholders left unfilled: {left}")
    return template


def write_scripts(cfg: SubmitConfig) -> tuple[Path, Path]:
    """Filled RUN/slurm/generate.sbatch and RUN/slurm/probe.sbatch; creates RUN/logs."""
    if cfg.shards < 1:
        raise TribunalError(f"--shards must be at least 1, got {cfg.shards}")
    if not (TEMPLATES / "generate.sbatch").exists():
        raise TribunalError(f"sbatch templates not found in {TEMPLATES}: run from a tribunal source checkout")
    run = Path(cfg.run_dir).resolve()
    (run / "slurm").mkdir(parents=True, exist_ok=True)
    (run / "logs").mkdir(exist_ok=True)
    tribunal = f"{shlex.quote(sys.executable)} -m tribunal.cli"
    common = {
        "RUN_DIR": run, "SETUP": "\n".join(cfg.setup) or "# (none)", "TRIBUNAL": tribunal, "BIN_DIR": BIN_DIR,
    }
    gen = fill((TEMPLATES / "generate.sbatch").read_text(), {
        **common, "SITE_SBATCH": _site_lines(cfg, cfg.gpus, cfg.mem), "TIME": cfg.time,
        "LAST_SHARD": cfg.shards - 1, "SHARDS": cfg.shards, "MAX_REQUEUES": cfg.max_requeues,
        "GENERATE_ARGS": " ".join(shlex.quote(a) for a in generate_arguments(cfg)),
    })
    probe = fill((TEMPLATES / "probe.sbatch").read_text(), {
        **common, "SITE_SBATCH_PROBE": _site_lines(cfg, 0, cfg.mem), "PROBE_TIME": cfg.probe_time,
        "PROBE_MEMORY": cfg.probe_memory, "PROBE_ARGS": " ".join(shlex.quote(str(a)) for a in cfg.probe_args),
    })
    gen_path, probe_path = run / "slurm" / "generate.sbatch", run / "slurm" / "probe.sbatch"
    gen_path.write_text(gen)
    probe_path.write_text(probe)
    (run / "slurm" / "submit.json").write_text(json.dumps({k: v for k, v in vars(cfg).items()}, indent=1, default=str))
    return gen_path, probe_path


def commands(gen_path: Path, probe_path: Path) -> list[str]:
    """The exact shell commands that submit both jobs, the probe after the whole array succeeded."""
    return [
        f"GEN=$(sbatch --parsable {shlex.quote(str(gen_path))})",
        f"sbatch --parsable --dependency=afterok:$GEN {shlex.quote(str(probe_path))}",
    ]


def _sbatch(args: list[str]) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise TribunalError("sbatch not found: submit from a SLURM login node, or run the printed commands there") from None
    if done.returncode != 0:
        raise TribunalError(f"sbatch failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return done.stdout.strip().split(";")[0]


def submit(gen_path: Path, probe_path: Path) -> dict:
    gen = _sbatch([str(gen_path)])
    probe = _sbatch([f"--dependency=afterok:{gen}", str(probe_path)])
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
