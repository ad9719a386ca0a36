"""Reading config files (experiment/config_files.py): defaults chains, per_task merging, and what plain YAML would
accept silently refused in one line naming the file."""

import pytest

from experiment.config_files import read_config_file
from experiment.errors import ConfigError

KNOWN = {"lr", "epochs", "seed"}


def check_key(name, where):
    if name not in KNOWN:
        raise ConfigError(f"unknown configuration key '{name}' in {where}")


def test_a_defaults_chain_is_merged_in_order_and_per_task_entries_combine(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 0.1\nepochs: 5\nper_task: {2: {lr: 0.01}, 3: {epochs: 1}}\n")
    (tmp_path / "mid.yaml").write_text("defaults: base.yaml\nepochs: 7\nper_task: {2: {epochs: 2}}\n")
    (tmp_path / "top.yaml").write_text("defaults: [mid.yaml]\nseed: 3\nper_task: {3: {epochs: 4}}\n")
    values, per_task = read_config_file(tmp_path / "top.yaml", check_key)
    assert values == {"lr": 0.1, "epochs": 7, "seed": 3}
    assert per_task == {2: {"lr": 0.01, "epochs": 2}, 3: {"epochs": 4}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 0.1\nlr: 0.2\n", r"key 'lr' is given twice \(lines 1 and 2\)"),
        ("", "is empty"),
        ("per_task: {0: {lr: 1}}\n", "with N >= 1, got 0"),
        ("per_task: [1, 2]\n", "'per_task' must map task numbers"),
        ("lrr: 0.1\n", "unknown configuration key 'lrr'"),
        ("per_task: {2: {lrr: 1}}\n", "per_task 2"),
        ("defaults: self.yaml\n", "includes itself through 'defaults'"),
    ],
)
def test_what_yaml_would_accept_silently_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "self.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_config_file(path, check_key)
    assert "\n" not in str(info.value) and "self.yaml" in str(info.value)


def test_bytes_that_are_not_utf8_are_refused(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("lr: 0.1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml") as info:
        read_config_file(path, check_key)
    assert "\n" not in str(info.value)
