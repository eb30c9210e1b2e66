"""`tribunal steer`: does moving the model along the probe's direction change what it does, more than moving it
along a random direction?

Each arm samples the same (problem, sample) pairs with the same per-trace seeds, every trace kept, into a store of
its own (OUT/arms/NAME/store.h5), so arms differ only by the intervention:

- the baseline: alpha = 0 (the hook is installed and adds zero: its store equals an unsteered run's);
- the direction: the residual leaving layer L shifted by alpha * sigma * d at every generated position, for each
  nonzero alpha (d: the trajectory cell's saved unit direction; sigma: the standard deviation of d . x over the
  probing store's generated tokens at L, so alpha is in the direction's natural units);
- the controls: the same shift, alpha * sigma, along each of K random unit directions orthogonal to d (matched norm);
- the ablation: the component along d projected out.

report/steering_report.py measures each arm against the baseline (accuracy, length, reflection cues, answers
changed; problem-bootstrap CIs on paired differences) and the direction's effect against the random ones'. Every
input is checked, the probing store measured and the model loaded before the first arm's store is created.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import TribunalError
from .probes import directions as saved
from .report.steering_report import steering_report
from .store import open_store
from .traces.generate import run_generation
from .traces.models import decoder_blocks, keep_loaded, load_model, recorded_model_id
from .traces.settings import GenerateConfig, option

log = logging.getLogger("tribunal.steer")

ARMS_FOLDER = "arms"
MAX_SANE_ALPHA = 16.0  # beyond this many standard deviations the model is pushed far outside its own states
# generate options steer sets itself or does not take: the arms keep every trace, and monitor nothing
NOT_STEER_OPTIONS = ("monitor", "exit_policy", "exit_rule", "exit_threshold", "exit_answer", "exit_answer_budget",
                     "keep_all", "target_correct", "target_incorrect", "shard")


@dataclass
class SteerConfig:
    layer: int | None = option(None, "Layer to steer at: its trajectory cell's direction (default: the cell the "
                                     "directions use).")
    alpha: str = option("-8,-4,0,4,8", "Shifts, in standard deviations of the direction's projection on the probing "
                                       "store, a comma list (0, the baseline, is added if missing).")
    random_directions: int = option(8, "Random unit directions orthogonal to the probe's, each shifted by the same "
                                       "amounts: the controls.")
    no_ablation: bool = option(False, "Leave out the arm that projects the direction out.")
    probing_store: str | None = option(None, "Store(s) to measure the projection's spread on (default: the stores "
                                             "the probes were fit on, as the directions file records them).")
    bootstrap: int = option(2000, "Problem-bootstrap draws of the paired differences.")

    @classmethod
    def cli_fields(cls):
        return list(fields(cls))

    def alphas(self) -> list[float]:
        """The alpha list, sorted, with 0 in it."""
        try:
            values = {float(a) for a in str(self.alpha).split(",") if a.strip()}
        except ValueError:
            raise TribunalError(f"--alpha {self.alpha!r}: give numbers separated by commas, e.g. -8,-4,0,4,8") from None
        if not all(math.isfinite(a) for a in values):
            raise TribunalError(f"--alpha {self.alpha!r}: every shift must be a finite number")
        return sorted(values | {0.0})

    def validate(self) -> list[str]:
        """Refuse bad values; returns warnings (shifts far outside the model's own spread)."""
        alphas = self.alphas()
        if len(alphas) < 2:
            raise TribunalError("--alpha: give at least one nonzero shift")
        if self.random_directions < 0:
            raise TribunalError(f"--random-directions must be 0 or more, got {self.random_directions}")
        if self.bootstrap < 100:
            raise TribunalError(f"--bootstrap must be at least 100, got {self.bootstrap}")
        wild = [a for a in alphas if abs(a) > MAX_SANE_ALPHA]
        return [f"--alpha {a:g} moves the residual {abs(a):g} standard deviations of the direction's own spread, "
                f"far outside the states the model produces (|alpha| <= {MAX_SANE_ALPHA:g} is the sane range): what "
                "it changes says little about the direction" for a in wild]


def arm_name(kind: str, alpha: float | None = None, index: int | None = None) -> str:
    if kind == "baseline":
        return "baseline"
    if kind == "ablation":
        return "ablation"
    return f"{'direction' if kind == 'direction' else f'random{index}'}_a{alpha:+g}"


def random_directions(d: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, d_model) unit vectors drawn from a Gaussian and made orthogonal to d: the controls."""
    rng = np.random.default_rng([seed, 20])
    r = rng.standard_normal((count, len(d)))
    r -= np.outer(r @ d, d)
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def _sha256(vector: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(vector, np.float32).tobytes()).hexdigest()


def _check_probes(probes_dir, doc: dict, config: GenerateConfig, layer: int | None) -> dict:
    """The trajectory cell to steer with, refused for another model or a layer without a direction."""
    prov = doc.get("provenance", {})
    want = recorded_model_id(config.model)
    if prov.get("model") != want:
        raise TribunalError(f"the probes in {probes_dir} were fit on model {prov.get('model')!r}, --model gives "
                            f"{want!r}: steer the model the probes were fit on")
    traj = doc.get("trajectory")
    if not traj:
        raise TribunalError(f"{probes_dir} has no trajectory probes: run `tribunal probe trajectory` first")
    chosen = traj["selection"].get("final") or traj["selection"]["chosen"]
    layers = sorted({c["layer"] for c in traj["cells"]})
    if layer is not None and int(layer) not in layers:
        raise TribunalError(f"--layer {layer}: the probes in {probes_dir} have directions for layers {layers} only")
    return saved.pick_cell(doc, layer, chosen["aggregation"])


def _sigma(doc: dict, probing_store, layer: int, direction: np.ndarray) -> tuple[float, list[str]]:
    """sigma: the spread of direction . x over the probing store's generated tokens at `layer`; and its files."""
    specs = probing_store or [s["path"] for s in doc["provenance"]["stores"]]
    if not probing_store:
        missing = [s for s in specs if not Path(s).exists()]
        if missing:
            raise TribunalError(f"the probes' store {missing[0]} is not there (moved?): give --probing-store")
    with open_store(specs) as store:
        if store.model_id != doc["provenance"]["model"] or store.d_model != len(direction):
            raise TribunalError(f"the probing store holds model {store.model_id!r} (d_model {store.d_model}), the "
                                f"probes model {doc['provenance']['model']!r}: give the store the probes were fit on")
        if layer not in store.layers:
            raise TribunalError(f"the probing store lacks layer {layer} (it has {list(store.layers)})")
        sigma = saved.projection_sd(store, layer, direction)
        files = [str(s.path) for s in store.shards]
    if not sigma > 0:
        raise TribunalError(f"the direction's projection does not vary on the probing store at layer {layer}")
    return sigma, files


def plan_arms(direction: np.ndarray, randoms: np.ndarray, alphas: list[float], sigma: float, ablation: bool,
              describe: dict) -> list[dict]:
    """Every arm: its name, kind, alpha and the intervention its generation runs under (GenerateConfig.intervention)."""
    arms = []

    def arm(kind, alpha, index, unit, how):
        vector = unit if how == "ablate" else alpha * sigma * unit
        if how == "add" and alpha == 0:  # x + (-0.0) is x bit for bit, for every x (+0.0 would turn -0.0 into +0.0)
            vector = np.full(len(unit), -0.0)
        name = arm_name(kind, alpha, index)
        arms.append({"name": name, "kind": kind, "alpha": alpha, "random_index": index, "intervention": {
            **describe, "arm": name, "kind": how, "alpha": alpha, "shift_norm": None if how == "ablate" else
            abs(alpha) * sigma, "direction": "random" if kind == "random" else "probe", "random_index": index,
            "direction_sha256": _sha256(unit), "vector": [float(x) for x in vector]}})

    arm("baseline", 0.0, None, direction, "add")
    for alpha in (a for a in alphas if a != 0):
        arm("direction", alpha, None, direction, "add")
        for i, r in enumerate(randoms):
            arm("random", alpha, i, r, "add")
    if ablation:
        arm("ablation", None, None, direction, "ablate")
    return arms


def steer(probes_dir, out_dir, options: dict | None = None, progress: bool = True, **steer_options) -> dict:
    """Sample every arm into OUT/arms/, then measure them (report.steering_report) into OUT. options: the
    generator's (GenerateConfig fields but NOT_STEER_OPTIONS); steer_options: SteerConfig fields. Returns the
    report's result with 'status' ('done' or 'interrupted': rerun to resume) and 'warnings'."""
    options = dict(options or {})
    refused = sorted(set(options) & set(NOT_STEER_OPTIONS))
    if refused:
        raise TribunalError(f"steer sets --{refused[0].replace('_', '-')} itself (every arm keeps every trace and "
                            "monitors nothing): leave it out")
    cfg = SteerConfig(**steer_options)
    warnings = cfg.validate()
    for warning in warnings:
        log.warning(warning)
    out = Path(out_dir)
    base = GenerateConfig(out=str(out / ARMS_FOLDER / "baseline" / "store.h5"), keep_all=True, progress=progress,
                          **options).validate()
    doc = saved.load(probes_dir)
    cell = _check_probes(probes_dir, doc, base, cfg.layer)
    layer = int(cell["layer"])
    direction = np.asarray(cell["direction"], np.float64)
    direction /= np.linalg.norm(direction)
    with keep_loaded():
        model, _ = load_model(base.model, revision=base.revision, compute_dtype=base.compute_dtype,
                              device_map=base.device_map, trust_remote_code=base.trust_remote_code)
        d_model, depth = int(model.config.hidden_size), len(decoder_blocks(model))
        if d_model != len(direction) or layer >= depth:
            raise TribunalError(f"the probes' direction has {len(direction)} dimensions at layer {layer}; the model "
                                f"has d_model {d_model} and {depth} layers: these probes are of another model")
        sigma, probing = _sigma(doc, cfg.probing_store, layer, direction)
        describe = {"probes": str(Path(probes_dir).resolve()), "layer": layer,
                    "cell": {"layer": layer, "aggregation": cell["aggregation"]}, "sigma": sigma,
                    "probing_store": probing, "random_seed": base.seed, "positions": "generated"}
        arms = plan_arms(direction, random_directions(direction, cfg.random_directions, base.seed), cfg.alphas(),
                         sigma, not cfg.no_ablation, describe)
        for i, arm in enumerate(arms, 1):
            log.info("steer: arm %d/%d: %s", i, len(arms), arm["name"])
            store = out / ARMS_FOLDER / arm["name"] / "store.h5"
            summary = run_generation(GenerateConfig(**{**vars(base), "out": str(store),
                                                       "intervention": arm["intervention"]}))
            arm["store"] = str(store)
            if summary["status"] != "done":
                return {"status": "interrupted", "arm": arm["name"], "warnings": warnings, "generate": summary}
    report = steering_report([{k: a[k] for k in ("name", "kind", "alpha", "random_index", "store")} for a in arms],
                             out, bootstrap=cfg.bootstrap, seed=base.seed)
    return {**report, "status": "done", "warnings": warnings, "layer": layer, "sigma": sigma,
            "arm_names": [a["name"] for a in arms]}
