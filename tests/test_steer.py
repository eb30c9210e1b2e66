"""`tribunal steer` (tribunal/steer.py) on a tiny model whose end of text depends on one known direction: the
baseline arm is an unsteered run bit for bit, steering along the direction moves the length where random
directions do not, every arm's store records its intervention and is refused by the probes, and bad input is
refused before anything is written."""

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tribunal.cli import main
from tribunal.errors import TribunalError
from tribunal.probes.directions import FORMAT, VERSION, projection_sd
from tribunal.probes.run import probe_tokens
from tribunal.problems.synthetic import make_problems
from tribunal.steer import NOT_STEER_OPTIONS, SteerConfig, random_directions, steer
from tribunal.store import open_store
from tribunal.traces.generate import GenerateConfig, run_generation
from tribunal.traces.models import EMBEDDED_MODEL, recorded_model_id

LAYER, D_MODEL = 2, 32
DIRECTION = np.eye(D_MODEL)[0]  # the model's end-of-text logit reads this coordinate of the residual


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama whose end-of-text logit is 3 x (the final normed residual along DIRECTION), problems, a probing
    store it sampled, and a probes folder whose trajectory direction at LAYER is DIRECTION."""
    root = tmp_path_factory.mktemp("steer")
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = torch.tensor(3.0 * DIRECTION, dtype=torch.float32)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n"
                                for p in make_problems(40, seed=7)))
    options = dict(model=str(root / "model"), dataset=str(problems), layers="1,2", max_problems=8,
                   samples_per_problem=2, max_new_tokens=40, batch_size=8, dtype="float32")
    probing = root / "probing.h5"
    run_generation(GenerateConfig(out=str(probing), keep_all=True, progress=False, **options))
    probes = probes_folder(root / "probes", recorded_model_id(options["model"]), probing)
    return {"root": root, "options": options, "probes": probes, "probing": probing}


def probes_folder(path, model_id, store, layers=(1, 2)):
    """A directions file as `probe trajectory` writes it, with DIRECTION as every cell's direction."""
    path.mkdir(parents=True, exist_ok=True)
    cells = [{"layer": layer, "aggregation": "mean", "direction": DIRECTION.tolist(), "weight_norm": 1.0, "bias": 0.0}
             for layer in layers]
    doc = {"format": FORMAT, "version": VERSION,
           "provenance": {"model": model_id, "d_model": D_MODEL, "layers": list(layers), "stores": [{"path": str(store)}]},
           "trajectory": {"selection": {"final": {"layer": LAYER, "aggregation": "mean"}}, "cells": cells}}
    (path / "implicit_value_directions.json").write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def steered(setup):
    out = setup["root"] / "steered"
    result = steer(setup["probes"], out, setup["options"], progress=False, alpha="-4,0,4", random_directions=3,
                   bootstrap=500)
    return out, result


def read(path):
    with open_store(path) as store:
        out = {}
        for i in range(store.n_traces):
            t = store.trace(i)
            out[(t.problem_id, t.sample_index)] = (t.token_ids, t.logprobs, t.entropies,
                                                   store.activations(2, i).view(np.uint32), t.label, t.text)
        return out, store.attrs["generation_settings"]


def test_the_baseline_arm_is_an_unsteered_run_bit_for_bit(setup, steered, tmp_path):
    out, result = steered
    plain, _ = read(setup["probing"])  # the same options, no intervention
    baseline, settings = read(out / "arms" / "baseline" / "store.h5")
    assert plain.keys() == baseline.keys() and len(plain) == 16
    for key in plain:
        for a, b in zip(plain[key], baseline[key]):  # bytes: NaN (prompt log-probs) equals NaN, -0.0 is not 0.0
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), key
    assert settings["intervention"]["arm"] == "baseline" and settings["intervention"]["alpha"] == 0.0
    moved, _ = read(out / "arms" / "direction_a+4" / "store.h5")
    assert any(not np.array_equal(moved[k][0], plain[k][0]) for k in plain)  # steering did something


def test_arms_record_their_intervention_and_share_pairs_and_seeds(setup, steered):
    out, result = steered
    assert result["status"] == "done" and result["layer"] == LAYER
    assert result["arm_names"] == ["baseline", "direction_a-4", *[f"random{i}_a-4" for i in range(3)],
                              "direction_a+4", *[f"random{i}_a+4" for i in range(3)], "ablation"]
    with open_store(setup["probing"]) as store:
        sigma = projection_sd(store, LAYER, DIRECTION)
    assert result["sigma"] == pytest.approx(sigma)
    randoms = random_directions(DIRECTION, 3, 0)
    assert np.allclose(randoms @ DIRECTION, 0) and np.allclose(np.linalg.norm(randoms, axis=1), 1)
    seeds = None
    for name in result["arm_names"]:
        with open_store(out / "arms" / name / "store.h5") as store:
            how = store.attrs["generation_settings"]["intervention"]
            assert how["arm"] == name and how["layer"] == LAYER and how["sigma"] == pytest.approx(sigma)
            assert how["kind"] == ("ablate" if name == "ablation" else "add") and "vector" not in how
            if name.startswith("random"):
                assert how["direction"] == "random" and how["shift_norm"] == pytest.approx(4 * sigma)
            keyed = sorted(zip(store.table["problem_id"], store.table["sample_index"], store.table["seed"]))
            assert seeds is None or keyed == seeds
            seeds = keyed


def test_the_direction_moves_the_length_where_random_directions_do_not(steered):
    """The model ends its text along DIRECTION: pushing along it ends traces sooner, against it later, projecting
    it out never; random directions of the same norm stay near the baseline."""
    out, result = steered
    doc = json.loads((out / "steering.json").read_text())
    assert (out / "steering.csv").exists() and (out / "dose_response.png").stat().st_size > 10_000
    effects = {a["name"]: a["effects"]["mean_tokens"]["value"] for a in doc["arms"] if a["kind"] != "baseline"}
    assert effects["direction_a+4"] < -8 < 8 < effects["direction_a-4"] and effects["ablation"] > 8
    plus = [effects[f"random{i}_a+4"] for i in range(3)]
    assert effects["direction_a+4"] < min(plus) - 8
    verdict = next(s for s in doc["specificity"] if s["alpha"] == 4 and s["outcome"] == "mean_tokens")
    assert verdict["verdict"] == "specific"
    assert any("generated tokens" in line and "is specific to the direction" in line for line in doc["sentences"])


def test_steered_arm_stores_are_refused_by_the_probes(steered, tmp_path):
    out, _ = steered
    with pytest.raises(TribunalError, match="--allow-steered"):
        probe_tokens(out / "arms" / "direction_a+4" / "store.h5", tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_a_rerun_resumes_every_arm_and_gives_the_same_numbers(setup, steered):
    out, result = steered
    again = steer(setup["probes"], out, setup["options"], progress=False, alpha="-4,0,4", random_directions=3,
                  bootstrap=500)
    assert again["summary"] == result["summary"]


@pytest.mark.parametrize("change, message", [
    (dict(layer=3), r"--layer 3: the probes in .* have directions for layers \[1, 2\] only"),
    (dict(alpha="4,x"), "--alpha '4,x': give numbers"),
    (dict(alpha="0"), "at least one nonzero shift"),
    (dict(random_directions=-1), "--random-directions must be 0 or more"),
])
def test_bad_steer_options_are_refused_before_anything_is_written(setup, tmp_path, change, message):
    with pytest.raises(TribunalError, match=message):
        steer(setup["probes"], tmp_path / "out", setup["options"], progress=False, **change)
    assert not (tmp_path / "out").exists()


def test_probes_of_another_model_are_refused_in_one_line(setup, tmp_path):
    other = probes_folder(tmp_path / "other", "tribunal/embedded-default", setup["probing"])
    result = CliRunner().invoke(main, ["steer", str(other), "--out", str(tmp_path / "out"), "--model",
                                       setup["options"]["model"], "--dataset", setup["options"]["dataset"]])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "were fit on model 'tribunal/embedded-default'" in result.output
    assert not (tmp_path / "out").exists()
    wide = probes_folder(tmp_path / "wide", recorded_model_id(setup["options"]["model"]), setup["probing"], (1, 2, 7))
    doc = json.loads((wide / "implicit_value_directions.json").read_text())
    doc["trajectory"]["selection"]["final"]["layer"] = 7
    (wide / "implicit_value_directions.json").write_text(json.dumps(doc))
    with pytest.raises(TribunalError, match="of another model"):
        steer(wide, tmp_path / "out", setup["options"], progress=False)
    assert not (tmp_path / "out").exists()


def test_a_shift_outside_the_sane_range_warns(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tribunal.steer"):
        result = steer(setup["probes"], tmp_path / "out", {**setup["options"], "max_problems": 2}, progress=False,
                       alpha="0,20", random_directions=0, no_ablation=True, bootstrap=100)
    assert result["warnings"] and "--alpha 20 moves the residual 20 standard deviations" in caplog.text
    assert SteerConfig(alpha="-16,16").validate() == []


def test_steer_takes_the_generator_options_but_those_it_sets(setup, tmp_path):
    with pytest.raises(TribunalError, match="steer sets --keep-all itself"):
        steer(setup["probes"], tmp_path / "out", {**setup["options"], "keep_all": False}, progress=False)
    help_text = CliRunner().invoke(main, ["steer", "--help"]).output
    assert "--random-directions" in help_text and "--temperature" in help_text
    assert not any(f"--{name.replace('_', '-')} " in help_text for name in NOT_STEER_OPTIONS)
