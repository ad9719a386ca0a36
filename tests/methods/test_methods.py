"""Every registered method, parametrised over the registry (a new method cannot ship untested): it runs from
the digits base config with only ``--method`` changed (its own defaults and requirements fill in the rest), and
training task 2 alone from the task-1 checkpoint gives the same results as the uninterrupted run."""

import json

import pytest

import main
from experiment.checkpoint import task_checkpoint_path
from experiment.config import ConfigError
from methods import METHODS
from tiny import ROOT, TWO_TASKS, write_digits

# Methods whose own keys cost minutes at their paper values (generator inversion, head refit): tiny values here.
GENERATOR = ["--gen_iterations=2", "--gen_batch_size=8", "--gen_width=8", "--gen_z_dim=16"]
TINY = {"abd": GENERATOR, "rdfcil": [*GENERATOR, "--rdfcil_ft_epochs=1"]}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_from_the_base_config_and_chains_per_task(name, tmp_path, capsys):
    data = write_digits(tmp_path / "digits.npz", 10, 300)  # 300 training images: the chain, in a quarter of the time
    base = ["--config", str(ROOT / "configs/digits/finetune.yaml"), f"--method={name}", *TWO_TASKS, *TINY.get(name, [])]
    base += ["--dataset=npz", f"--data_path={data}"]
    assert main.main([*base, f"--output_dir={tmp_path / 'full'}"]) == 0, capsys.readouterr().err
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert len(full["accuracy_matrix"]) == 2 and all(0 <= a <= 100 for a in full["accuracy_per_task"])
    first = str(task_checkpoint_path(tmp_path / "full", 1))
    step = [f"--output_dir={tmp_path / 'step'}", "--task=2", f"--saved_model_address={first}"]
    assert main.main([*base, *step]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "step" / "metrics.json").read_text())["accuracy_matrix"] == full["accuracy_matrix"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_digits_config_and_a_description(name):
    assert (ROOT / "configs" / "digits" / f"{name}.yaml").is_file(), "the benchmark runs configs/digits/<method>.yaml"
    assert (METHODS[name].__doc__ or "").strip(), "the class docstring's first line describes the method"


def test_graphs_is_refused_for_a_method_that_does_not_mask_padded_rows(make_cfg):
    for name in ("ccsi", "finetune", "joint"):
        METHODS[name].check_requirements(make_cfg(method=name, compile="graphs"))
    with pytest.raises(ConfigError, match=r"^key 'compile': graphs pads .* method 'lwf' does not mask padded rows"):
        METHODS["lwf"].check_requirements(make_cfg(method="lwf", compile="graphs"))
