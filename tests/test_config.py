"""tribunal/config.py: option files and the parsers of index lists, ranges and sizes."""

import pytest

from tribunal.config import parse_budget, parse_index_list, parse_range, parse_size, read_config


def test_yaml_and_toml_files_give_option_names_and_lists_as_comma_lists(tmp_path):
    (tmp_path / "a.yaml").write_text("max-new-tokens: 64\naggregations: [mean, last]\nlayers: [12, 16]\n")
    (tmp_path / "a.toml").write_text('folds = 3\naggregations = ["max"]\n')
    assert read_config(tmp_path / "a.yaml") == {"max_new_tokens": 64, "aggregations": "mean,last", "layers": "12,16"}
    assert read_config(tmp_path / "a.toml") == {"folds": 3, "aggregations": "max"}
    (tmp_path / "b.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config(tmp_path / "b.yaml")


def test_index_lists_ranges_and_sizes():
    assert parse_index_list("4,8,12-15") == [4, 8, 12, 13, 14, 15]
    assert parse_range("64-256") == (64, 256) and parse_range("100") == (100, 100)
    assert parse_size("512M") == 512 << 20 and parse_size("1.5G") == 3 << 29 and parse_size(1024) == 1024
    assert parse_budget("auto") is None and parse_budget("2G") == 2 << 30
    for parse, text in ((parse_index_list, "4,x"), (parse_range, "5-a"), (parse_size, "lots"), (parse_budget, "0")):
        with pytest.raises(ValueError, match=repr(text)):
            parse(text)
