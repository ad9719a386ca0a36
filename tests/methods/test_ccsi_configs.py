"""The shipped configs: every whole-run file validates, every sweep file expands to one valid command, and the
CCSI MedMNIST configs carry the authors' per-task hyper-parameters (docs/original-hyperparameters.md). No training."""

import re
from pathlib import Path

import pytest

import incremental_train_and_eval  # noqa: F401  (declares every key)
from experiment import config
from main import split_config_args
from tiny import ROOT
from tuning import sweep

CONFIGS = ROOT / "configs"
RUN_FILES = sorted(p for p in CONFIGS.glob("*/*.yaml") if not p.name.startswith(("_", "sweep_")))
SWEEP_FILES = sorted(CONFIGS.glob("*/sweep_*.yaml"))
MEDMNIST = ("bloodmnist", "pathmnist", "organamnist", "tissuemnist")

# The paper's protocol: (nb_cl_fg, nb_cl, seed) per data set.
SPLITS = {"bloodmnist": (2, 2, 0), "pathmnist": (3, 2, 1), "organamnist": (3, 3, 2), "tissuemnist": (2, 2, 3)}

# Values that differ between the original's configs/<Data>/sweep_task_<t>.yaml files (github.com/ubc-tea/
# Continual-Impression-CCSI, commit 27de826), typed from those files:
# task -> (nb_generation, main_loss_multiplier, tv_l2, ro, temprature, rs_ratio); task 1 has no nb_generation.
ORIGINAL = {
    "bloodmnist": {
        1: (None, 10, 0.01, 0.99, 1, 0.66),
        2: (16, 1, 0.01, 0.9, 1, 0.66),
        3: (24, 1, 0.001, 0.999, 1, 0.66),
        4: (30, 1, 0.01, 0.9, 1, 0.66),
    },
    "pathmnist": {
        1: (None, 10, 0.01, 0.99, 1, 0.66),
        2: (16, 1, 0.01, 0.99, 1, 0.66),
        3: (25, 1, 0.01, 0.9, 1, 0.66),
        4: (35, 1, 0.001, 0.9, 1, 0.66),
    },
    "organamnist": {
        1: (None, 10, 0.01, 0.99, 1, 0.66),
        2: (16, 1, 0.1, 0.9, 1, 0.66),
        3: (24, 1, 0.001, 0.99, 5, 0.66),
        4: (30, 1, 0.1, 0.9, 1, 0.5),
    },
    "tissuemnist": {
        1: (None, 10, 0.01, 0.99, 1, 0.66),
        2: (16, 1, 0.01, 0.99, 1, 0.66),
        3: (24, 1, 0.001, 0.99, 5, 0.66),
        4: (30, 1, 0.001, 0.9, 5, 0.66),
    },
}
TASK_KEYS = ("nb_generation", "main_loss_multiplier", "tv_l2", "ro", "temprature", "rs_ratio")

# Identical in all 16 original files, or fixed by the original code (main.py, the synthesis module, utils/utils.py).
COMMON = {
    "epochs": 100, "batch_size": 40, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "lr_gamma": 0.3,
    "lr_patience": 5, "lamda": 5.0, "adapt_lamda": True, "K": 1, "dist": 0.3, "lw_mr": 1.0, "da_coef": 1.0,
    "imprint": True, "syn_batch_size": 40, "syn_iterations": 5000, "syn_warmup": 100, "generation_lr": 0.05,
    "beta_2": 0.9, "syn_init": "mean", "init_noise": 0.1, "random_label": True, "jitter": 30, "do_flip": True,
    "r_feature": 1.0, "first_bn_multiplier": 10.0, "l2": 0.1, "backbone": "ccsi_resnet", "norm": "cn",
    "head": "cosine",
}  # fmt: skip


def sweep_config(path: Path) -> tuple[config.Config, dict]:
    """(config of the sweep's single command, the sweep's parameters); asserts exactly one command."""
    spec = sweep.read_sweep(path)
    points = sweep.grid_points(spec["parameters"])
    assert len(points) == 1, f"{path} expands to {len(points)} commands"
    command = sweep.build_command(spec, points[0])
    assert command[:3] == ["/usr/bin/env", ".venv/bin/python", "main.py"]  # as a wandb agent runs it
    files, rest = split_config_args(command[3:])
    assert files, f"{path}: the command passes no --config"
    return config.load_config([ROOT / f for f in files], config.parse_overrides(rest)), points[0]


def test_the_expected_files_exist():
    for ds in MEDMNIST:
        for method in ("ccsi", "finetune", "joint"):
            assert CONFIGS / ds / f"{method}.yaml" in RUN_FILES
        for t in (1, 2, 3, 4):
            assert CONFIGS / ds / f"sweep_task_{t}.yaml" in SWEEP_FILES


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_run_config_loads_and_validates(path):
    cfg = config.load_config([path])
    for task in cfg.per_task:
        cfg.for_task(task)  # per-task values were coerced by load_config; they resolve
    method = re.sub(r"_b\d+_inc\d+$", "", path.stem)  # cifar100 files: <method>_b<base>_inc<step>
    if method in config.OPTIONS["method"].choices:
        assert cfg.method == method, f"{path} runs method {cfg.method}"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sweep_expands_to_one_valid_command(path):
    spec = sweep.read_sweep(path)
    assert spec["method"] == "grid" and spec["program"] == "main.py"
    # a validation metric (never test under protocol clean), written by WandbLogger.log_summary
    assert spec["metric"] == {"name": "final/last_val_accuracy", "goal": "maximize"}
    assert spec["command"][:2] == ["${env}", ".venv/bin/python"]  # the project's interpreter, not PATH's python
    cfg, point = sweep_config(path)
    assert cfg.logger == "wandb"
    for key, value in point.items():  # the per_task entries of the --config file must not shadow a sweep value
        assert cfg.for_task(cfg.task).to_dict()[key] == config.coerce(config.OPTIONS[key], value), key


@pytest.mark.parametrize("ds", MEDMNIST)
def test_ccsi_config_has_the_paper_split_seed_and_original_values(ds):
    cfg = config.load_config([CONFIGS / ds / "ccsi.yaml"])
    assert (cfg.dataset, cfg.method) == (ds, "ccsi")
    assert (cfg.nb_cl_fg, cfg.nb_cl, cfg.seed) == SPLITS[ds]
    assert cfg.protocol == "improved"  # hyper-parameters only; --protocol=original reproduces the released code
    for task, expected in ORIGINAL[ds].items():
        values = cfg.for_task(task).to_dict()
        for key, want in zip(TASK_KEYS, expected):
            if want is not None:
                assert values[key] == pytest.approx(want), (ds, task, key)
        for key, want in COMMON.items():
            assert values[key] == want, (ds, task, key)
    assert set(cfg.per_task) <= {1, 2, 3, 4}


@pytest.mark.parametrize("ds", MEDMNIST)
@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_medmnist_bounds_share_the_paper_split_and_ccsi_backbone(ds, method):
    cfg, ccsi = config.load_config([CONFIGS / ds / f"{method}.yaml"]), config.load_config([CONFIGS / ds / "ccsi.yaml"])
    assert (cfg.dataset, cfg.method, cfg.protocol) == (ds, method, "improved")
    assert (cfg.nb_cl_fg, cfg.nb_cl, cfg.seed) == SPLITS[ds]
    shared = (
        "backbone",
        "norm",
        "head",
        "epochs",
        "batch_size",
        "lr",
        "optimizer",
        "scheduler",
        "lr_gamma",
        "lr_patience",
    )
    assert {k: getattr(cfg, k) for k in shared} == {k: getattr(ccsi, k) for k in shared}


@pytest.mark.parametrize("ds", MEDMNIST)
@pytest.mark.parametrize("task", [1, 2, 3, 4])
def test_sweep_task_continues_from_the_best_run_of_the_previous_task_sweep(ds, task):
    whole = config.load_config([CONFIGS / ds / "ccsi.yaml"])
    cfg, _ = sweep_config(CONFIGS / ds / f"sweep_task_{task}.yaml")
    assert cfg.task == task
    assert cfg.output_dir == f"runs/sweeps/{ds}/ccsi/task_{task}/seed{{seed}}-{{config_hash}}"  # a folder per point
    if task == 1:
        assert cfg.saved_model_address is None
    else:
        assert cfg.saved_model_address == f"best:runs/sweeps/{ds}/ccsi/task_{task - 1}"
    ignored = {"task", "saved_model_address", "logger", "output_dir"}
    one_task, all_tasks = cfg.for_task(task).to_dict(), whole.for_task(task).to_dict()
    assert {k: v for k, v in one_task.items() if k not in ignored and k != "per_task"} == {
        k: v for k, v in all_tasks.items() if k not in ignored and k != "per_task"
    }
