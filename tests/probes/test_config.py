"""ProbeConfig: the one definition of the probes' options, its checks and the arguments it writes."""

import subprocess
import sys

import pytest

from tribunal.errors import TribunalError
from tribunal.probes.config import ProbeConfig
from tribunal.store.reader import AGGREGATIONS, DEFAULT_BLOCK_BYTES


def test_aggregations_take_the_command_lines_comma_list_or_names():
    assert ProbeConfig().aggregations == AGGREGATIONS
    assert ProbeConfig(aggregations="mean, last").aggregations == ("mean", "last")
    assert ProbeConfig(aggregations=["max"]).aggregations == ("max",)


@pytest.mark.parametrize("options, flag", [
    ({"folds": 1}, "--folds"), ({"permutations": -1}, "--permutations"), ({"memory": "lots"}, "--memory"),
    ({"memory": 0}, "--memory"), ({"aggregations": "mean,median"}, "--aggregations"), ({"aggregations": ""}, "--aggregations"),
    ({"last_k": 0}, "--last-k"), ({"C": 0}, "-C"), ({"margin": 1.0}, "--margin"), ({"margin": -0.1}, "--margin"),
    ({"test_fraction": 1.0}, "--test-fraction"), ({"seed": -1}, "--seed"),
])
def test_bad_values_are_refused_naming_the_option(options, flag):
    with pytest.raises(TribunalError) as err:
        ProbeConfig(**options).validate()
    assert str(err.value).startswith(flag + " "), str(err.value)


def test_arguments_are_the_non_defaults_of_each_probe():
    cfg = ProbeConfig(folds=3, seed=7, aggregations="mean,last", last_k=4, test_fraction=0.3, margin=0.05)
    assert cfg.arguments("trajectory") == ["--folds", "3", "--seed", "7", "--aggregations", "mean,last", "--last-k", "4"]
    assert cfg.arguments("tokens") == ["--seed", "7", "--test-fraction", "0.3"]
    assert cfg.arguments("chunks") == ["--folds", "3", "--seed", "7", "--margin", "0.05"]
    assert ProbeConfig().arguments("trajectory") == []


def test_each_probe_takes_only_its_options():
    names = {p: {f.name for f in ProbeConfig.cli_fields(p)} for p in ("trajectory", "tokens", "chunks")}
    assert names["tokens"] == {"seed", "memory", "test_fraction", "allow_steered"}
    assert "margin" in names["chunks"] and "margin" not in names["trajectory"]
    assert {"aggregations", "last_k"} <= names["trajectory"] and not {"aggregations", "last_k"} & names["chunks"]
    assert {f.name for f in ProbeConfig.cli_fields()} == set().union(*names.values())


def test_block_bytes_follow_the_memory_budget_within_bounds():
    assert ProbeConfig(memory="1G").block_bytes == DEFAULT_BLOCK_BYTES
    assert ProbeConfig(memory="16M").block_bytes == 4 << 20
    assert ProbeConfig(memory=1000).block_bytes == 1 << 20
    assert ProbeConfig(memory="512M").memory_bytes == 512 << 20


def test_the_library_defaults_are_probe_configs():
    """Each probe default is written once: the estimators' keyword defaults are read from ProbeConfig (in the
    source, not only equal in value)."""
    import inspect
    import re

    from tribunal.probes import chunk_probe, early_exit, tokens, trajectory

    config = ProbeConfig()
    for func, name, field in [(trajectory.evaluate_cells, "folds", "folds"),
                              (trajectory.evaluate_cells, "permutations", "permutations"),
                              (trajectory.evaluate_cells, "seed", "seed"),
                              (trajectory.load_trajectory_data, "k", "last_k"),
                              (chunk_probe.evaluate_chunk_probe, "margin", "margin"),
                              (chunk_probe.evaluate_chunk_probe, "seed", "seed"),
                              (chunk_probe.evaluate_chunk_layers, "seed", "seed"),
                              (early_exit.choose_threshold, "margin", "margin"),
                              (tokens.fit_token_probe, "memory_bytes", "memory_bytes"),
                              (tokens.fit_token_probe, "test_fraction", "test_fraction"),
                              (tokens.fit_token_probe, "seed", "seed")]:
        assert inspect.signature(func).parameters[name].default == getattr(config, field), (func, name)
        signature = inspect.getsource(func).split("->")[0]
        assert re.search(rf"\b{name}: [^=,]+= DEFAULTS\.{field}\b", signature), (func.__name__, name)


def test_the_probes_never_import_click():
    code = ("import sys, tribunal.probes.config, tribunal.probes.run; "
            "assert 'click' not in sys.modules, 'click imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_steered_stores_are_refused_unless_allowed(tmp_path):
    """Probes describe the model's own behaviour: a store sampled under an intervention is refused by every probe
    command (through check_store) unless --allow-steered, and nothing is written."""
    from conftest import make_record, writer_kwargs
    from tribunal.probes.run import probe_trajectory
    from tribunal.store import StoreWriter, open_store

    path = tmp_path / "arm.h5"
    how = {"arm": "random2_a-4", "kind": "add", "layer": 2}
    with StoreWriter(path, **writer_kwargs(generation_settings={"intervention": how})) as w:
        w.append([make_record(i) for i in range(4)])
    with open_store(path) as store:
        with pytest.raises(TribunalError, match=r"under an intervention \(add at layer 2, random2_a-4\).*--allow-steered"):
            ProbeConfig().check_store(store)
        ProbeConfig(allow_steered=True).check_store(store)
    with pytest.raises(TribunalError, match="--allow-steered"):
        probe_trajectory(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
