"""Configuration: parsing, typing, validation and the one-line errors main.py turns into exit code 2."""

import subprocess
import sys

import pytest
import yaml

from experiment import config, key_reference
from experiment.config import ConfigError, Option, coerce, load_config, parse_overrides
from tiny import ROOT


def test_defaults_resolve_and_output_dir_names_the_run():
    cfg = load_config()
    assert cfg.method == "finetune" and cfg.seed == 0
    assert cfg.output_dir == "runs/{dataset}/{method}/{protocol}/seed{seed}-{config_hash}"  # filled when it starts
    with pytest.raises(ConfigError, match=r"unknown placeholder \{epoch\}"):
        load_config(overrides={"output_dir": "runs/{epoch}"})


def test_yaml_then_overrides_in_both_forms(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.5\nclass_order: [1, 0, 2]\n")
    cfg = load_config([path], parse_overrides(["--lr=0.25", "--batch_size", "8", "--augment=flip"]))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.augment) == (3, 0.25, 8, "flip")
    assert cfg.class_order == [1, 0, 2]
    assert isinstance(cfg.lr, float) and isinstance(cfg.batch_size, int)


def test_command_line_values_are_typed():
    cfg = load_config(overrides=parse_overrides(["--resume=yes", "--class_order=2,0,1", "--lr=1e-3"]))
    assert cfg.resume is True and cfg.class_order == [2, 0, 1] and cfg.lr == pytest.approx(1e-3)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown configuration key 'lrr'.*did you mean 'lr'"):
        parse_overrides(["--lrr=0.1"])
    path = tmp_path / "bad.yaml"
    path.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"'epochz' in .*bad.yaml.*did you mean 'epochs'"):
        load_config([path])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--epochs=2.5", "key 'epochs': expected int"),
        ("--epochs=-1", "key 'epochs': must be >= 0"),
        ("--lr=abc", "key 'lr': expected float"),
        ("--device=tpu", "key 'device': expected str .one of auto, cpu, cuda."),
        ("--resume=maybe", "key 'resume': expected bool"),
        ("--class_order=a,b", "key 'class_order': expected int_list"),
        ("--epochs=null", "key 'epochs': expected int"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=parse_overrides([override]))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config([bad])


def test_defaults_inheritance_and_per_task(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 7\nlr: 0.2\nper_task: {2: {lr: 0.01}}\n")
    (tmp_path / "run.yaml").write_text("defaults: base.yaml\nlr: 0.3\nper_task:\n  3: {epochs: 1}\n")
    cfg = load_config([tmp_path / "run.yaml"])
    assert (cfg.epochs, cfg.lr) == (7, 0.3)
    assert cfg.for_task(1).lr == 0.3
    assert cfg.for_task(2).lr == 0.01 and cfg.for_task(2).epochs == 7
    assert cfg.for_task(3).epochs == 1 and cfg.for_task(3).lr == 0.3


def test_command_line_wins_over_per_task(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.3\nper_task: {2: {lr: 0.01, epochs: 9}}\n")
    cfg = load_config([tmp_path / "run.yaml"], parse_overrides(["--lr=0.5"]))
    assert cfg.for_task(2).lr == 0.5 and cfg.for_task(2).epochs == 9
    assert cfg.replace(epochs=4).for_task(2).epochs == 4


def test_per_task_values_are_validated(tmp_path):
    (tmp_path / "run.yaml").write_text("per_task: {2: {epochs: -3}}\n")
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config([tmp_path / "run.yaml"])
    (tmp_path / "run.yaml").write_text("per_task: {2: {epoch: 3}}\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config([tmp_path / "run.yaml"])


def test_per_task_refuses_keys_that_hold_for_the_whole_run(tmp_path):
    (tmp_path / "run.yaml").write_text("per_task: {2: {seed: 3, lr: 0.1}, 3: {device: cpu}}\n")
    with pytest.raises(ConfigError, match=r"per_task': device, seed cannot change from task to task"):
        load_config([tmp_path / "run.yaml"])


def test_override_without_value_and_stray_argument():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--lr"])
    with pytest.raises(ConfigError, match="unexpected argument 'lr=3'"):
        parse_overrides(["lr=3"])


def test_config_is_read_only_and_saves_round_trip(tmp_path):
    cfg = load_config(overrides={"epochs": 4})
    with pytest.raises(AttributeError):
        cfg.epochs = 5
    cfg.save(tmp_path / "config.yaml")
    again = load_config([tmp_path / "config.yaml"])
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["epochs"] == 4


def test_duplicate_declaration_is_an_error():
    with pytest.raises(ValueError, match="declared twice"):
        config.register_options("x", [Option("lr", "float", 0.1, "dup")])


def test_coerce_bounds_and_choices():
    opt = Option("p", "float", 0.5, "a probability", min=0.0, max=1.0)
    assert coerce(opt, 1) == 1.0
    with pytest.raises(ConfigError, match="must be <= 1.0"):
        coerce(opt, 1.5)
    with pytest.raises(ConfigError):
        coerce(opt, True)


def test_docs_config_is_the_generated_reference():

    import main

    text = (ROOT / "docs" / "config.md").read_text()
    missing = [name for name in config.OPTIONS if f"`{name}`" not in text]
    regenerate = "regenerate: python main.py keys --markdown > docs/config.md"
    assert not missing, f"docs/config.md lacks keys ({regenerate}): {missing}"
    assert text == main.KEYS_HEADER + key_reference.reference_table() + "\n", (
        "docs/config.md is stale: regenerate it with python main.py keys --markdown > docs/config.md"
    )


# ----- one key set, closest keys, bare flags, notes ------------------------------------------------------------


def test_load_config_names_an_undeclared_override_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^unknown configuration key 'learning_rate' in the overrides \(did you mean 'lr'\?\)$"
    ):
        load_config(overrides={"learning_rate": 0.1})


@pytest.mark.e2e
def test_a_fresh_process_sees_every_key_through_the_engine_and_none_through_config_alone():
    """The key set does not depend on what else was imported: the engine's loader knows every key (threads too);
    experiment.config alone refuses an undeclared one in one line, never a KeyError."""
    probe = (
        "import sys\n"
        "from experiment import config\n"
        "try:\n"
        "    config.load_config(overrides={'threads': 1})\n"
        "except config.ConfigError as err:\n"
        "    print('refused:', err)\n"
        "import incremental_train_and_eval as engine\n"
        "cfg = engine.load_run_config(overrides={'threads': 1}, args=['--epochs', '2', '--resume'])\n"
        "print(cfg.threads)\n"
        "print(len(config.OPTIONS))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    refused, threads, count = done.stdout.strip().splitlines()
    assert refused.startswith("refused: unknown configuration key 'threads' in the overrides")
    assert threads == "1" and int(count) == len(config.OPTIONS)  # the same keys as this test process


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("learning_rate", "lr"),
        ("lrr", "lr"),
        ("epochz", "epochs"),
        ("temperature", "temprature"),
        ("batchsize", "batch_size"),
    ],
)
def test_closest_key(typed, meant):
    assert config.closest_key(typed) == meant


def test_a_bare_flag_is_true_for_a_bool_key_only():
    assert parse_overrides(["--resume", "--epochs", "3", "--progress"]) == {
        "resume": "true",
        "epochs": "3",
        "progress": "true",
    }
    with pytest.raises(ConfigError, match=r"override '--epochs' has no value: write --epochs=VALUE"):
        parse_overrides(["--epochs", "--resume"])


def test_keys_the_method_does_not_read_are_named_in_one_note(caplog):
    with caplog.at_level("WARNING"):
        load_config([ROOT / "configs" / "digits" / "ccsi.yaml"], {"method": "icarl"})
    [note] = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert note.startswith("note: method icarl does not use K, class_weights, da_coef, dist, do_flip, generation_lr")
    assert "rs_ratio" in note and "lamda" in note and "more" not in note
    assert note.endswith("(keys of ccsi, lucir, synthesis); they are ignored")
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_config([ROOT / "configs" / "digits" / "ccsi.yaml"])  # CCSI reads its own, LUCIR's and synthesis keys
    assert not [r for r in caplog.records if "does not use" in r.getMessage()]


def test_keys_text_fits_100_columns_filters_and_shows_preset_values():
    text = key_reference.keys_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "\n[run]\n" in text and "\n  lr (float, task) = 0.1" in text
    ccsi = key_reference.keys_text(method="ccsi")
    assert "\n  lamda (float, task)" in ccsi and "\n[wa]" not in ccsi and "\n[icarl]" not in ccsi
    assert "  class_stats_update (str, task) = frozen -> refresh (protocol=improved)" in ccsi
    assert "-> refresh" not in key_reference.keys_text(group="ccsi", protocol="clean")
    lucir = key_reference.keys_text(group="model", method="lucir")
    assert "head (str, experiment) = " in lucir and "(method=lucir)" in lucir
    with pytest.raises(ConfigError, match="--group 'nope' is not a group of keys"):
        key_reference.keys_text(group="nope")
    with pytest.raises(ConfigError, match="key 'method': expected str"):
        key_reference.keys_text(method="nope")
