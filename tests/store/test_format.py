"""The store format (tribunal/store/format.py): the documented parts every store has and every reader checks,
the encodings, schema versions, and identity differences named one setting at a time."""

import json
import re
import shutil
import subprocess

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT, make_record, writer_kwargs
from tribunal.cli import main
from tribunal.errors import StoreError
from tribunal.store import StoreWriter, open_store
from tribunal.store import format as fmt

from .cli_output import one_line_error


def documented_names():
    """Root attributes and datasets that docs/store-format.md names (the contract the tests hold the code to)."""
    doc = (ROOT / "docs" / "store-format.md").read_text()
    attrs_section = doc.split("### Root attributes", 1)[1].split("All but", 1)[0]  # the list, not the prose after it
    attrs = [a for a in re.findall(r"`([a-z_]+)`", attrs_section) if a not in ("synth", "merged_from", "subset")]
    datasets = [d for d, optional in documented_datasets() if not optional and not d.startswith("synth/")]
    return attrs, datasets


def documented_datasets() -> list[tuple[str, bool]]:
    """(dataset, whether the layout calls it optional) for each dataset in the doc's layout block."""
    doc = (ROOT / "docs" / "store-format.md").read_text()
    layout = doc.split("## Layout", 1)[1].split("```")[1]
    return [(line.split()[0].lstrip("/"), "optional:" in line) for line in layout.splitlines()
            if line.startswith("/") and line.split()[0] != "/"]


def test_the_documented_optional_datasets_are_what_a_monitored_store_adds(tmp_path):
    from .monitored import monitored_kwargs, monitored_record

    optional = {d for d, is_optional in documented_datasets() if is_optional}
    with StoreWriter(tmp_path / "s.h5", **monitored_kwargs()) as w:
        w.append([monitored_record(0)])
    with StoreWriter(tmp_path / "plain.h5", **writer_kwargs()) as w:
        w.append([make_record(0)])
    names = {}
    for name in ("s", "plain"):
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            found = set()
            f.visititems(lambda key, obj: found.add(key) if isinstance(obj, h5py.Dataset) else None)
            names[name] = found
    assert names["s"] - names["plain"] == optional


def _mutations():
    attrs, datasets = documented_names()
    assert "layers" in attrs and "d_model" in attrs and "traces/table" in datasets, (attrs, datasets)
    return [("attr", a) for a in attrs] + [("dataset", d.replace("layer_LLL", "layer_005")) for d in datasets]


@pytest.mark.parametrize("kind,name", _mutations())
def test_a_store_missing_any_documented_part_gets_a_clear_message(good_store, kind, name):
    with h5py.File(good_store, "r") as f:
        assert (name in f.attrs) if kind == "attr" else (name in f), f"the doc names {name} but stores lack it"
    with h5py.File(good_store, "r+", locking=False) as f:
        if kind == "attr":
            del f.attrs[name]
        else:
            del f[name]
    runner = CliRunner()
    verify = runner.invoke(main, ["verify", str(good_store)])
    inspect = runner.invoke(main, ["inspect", str(good_store)])
    for result in (verify, inspect):
        assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, AttributeError, TypeError, ValueError)), result.output
    if name == "format":  # without its format tag a file is just HDF5
        for result in (verify, inspect):
            assert result.exit_code == 1 and "not a tribunal store" in result.output, result.output
        return
    core = (kind == "attr" and name in fmt.CORE_ATTRS) or kind == "dataset"
    needle = f"'{name}'" if kind == "attr" else f"/{name}"
    if core or kind == "attr":  # verify fails naming it
        assert verify.exit_code == 1 and needle in verify.output, verify.output
        assert any(line.startswith("FAIL") for line in verify.output.splitlines()), verify.output
    if core:  # inspect: one line, naming it
        lines = [line for line in inspect.output.splitlines() if line]
        assert inspect.exit_code == 1 and len(lines) == 1 and needle in lines[0], inspect.output
    else:
        assert inspect.exit_code == 0, inspect.output


def test_hdf5_that_is_not_a_store(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    one_line_error(["inspect", str(tmp_path / "other.h5")], "not a tribunal store")


def test_newer_schema(good_store):
    with h5py.File(good_store, "r+") as f:
        f.attrs["schema_version"] = 99
    one_line_error(["inspect", str(good_store)], "newer than this tribunal")
    with pytest.raises(StoreError, match="upgrade tribunal"):
        StoreWriter(good_store, **writer_kwargs()).open()


def test_bfloat16_words_kept_bit_for_bit(tmp_path):
    words = np.random.default_rng(0).integers(0x3000, 0x4000, (2, 10, 16)).astype(np.uint16)
    rec = make_record(0, tokens=10)
    rec.activations = words
    with StoreWriter(tmp_path / "s.h5", **writer_kwargs(dtype="bfloat16")) as w:
        w.append([rec])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["activations/layer_005"][:], words[1])
        assert f["activations/layer_005"].attrs["encoding"] == "bfloat16-bits-in-uint16"
    with open_store(tmp_path / "s.h5") as store:
        expected = (words[1].astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(store.activations(5, 0), expected)


def test_file_explains_itself(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs(), generation_settings={"temperature": 1.0}, dataset_id="gsm8k") as w:
        w.append([make_record(0)])
    with h5py.File(path, "r") as f:
        for attr in fmt.REQUIRED_ATTRS:
            assert attr in f.attrs, attr
        assert json.loads(f.attrs["generation_settings"]) == {"temperature": 1.0}
        assert "description" in f["traces/table"].attrs
        assert h5py.check_enum_dtype(f["traces/table"].dtype["label"]) == fmt.LABEL_CODES
        assert list(f["commit"].attrs["fields"]) == list(fmt.COMMIT_FIELDS)


def test_h5dump_shows_the_labels_and_the_activations(tmp_path):
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump not installed (apt-get install hdf5-tools; .ci/run does)")
    path = tmp_path / "s.h5"
    with StoreWriter(path, **writer_kwargs()) as w:
        w.append([make_record(0)])
    dump = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, check=True)
    assert '"correct"' in dump.stdout and "activations" in dump.stdout


def test_a_refused_resume_names_the_setting_and_both_values_in_one_line(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "deep" / "folder" / "s.h5")  # a missing folder is created
    assert runner.invoke(main, ["synth", out, "--traces", "6", "--problems", "3", "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["synth", out, "--traces", "6", "--problems", "3", "--signal", "0.6", "--quiet"])
    lines = [line for line in result.output.splitlines() if line]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "synth.signal: store has 0.8, asked 0.6" in lines[0] and "{" not in lines[0], lines[0]
