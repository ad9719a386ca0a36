"""The optimiser and learning-rate schedule of each task's training, and their configuration keys."""

from __future__ import annotations

from typing import Any

import torch

from experiment.config import Config, Option, register_options

register_options(
    "optimization",
    [
        Option("lr", "float", 0.1, "learning rate (paper: 0.1, SGD)", min=0.0, min_exclusive=True),
        Option("optimizer", "str", "sgd", "optimiser", choices=("sgd", "adam")),
        Option("momentum", "float", 0.0, "SGD momentum (paper: 0)", min=0.0, max=0.999),
        Option("weight_decay", "float", 0.0, "weight decay (paper: 0)", min=0.0),
        Option(
            "scheduler",
            "str",
            "none",
            "lr schedule per task: step (lr_milestones), cosine, plateau (max of the monitored accuracy), "
            "plateau_original (the released code's ReduceLROnPlateau in 'min' mode fed with accuracy)",
            choices=("none", "step", "cosine", "plateau", "plateau_original"),
        ),
        Option("lr_milestones", "int_list", [], "epochs at which the step scheduler multiplies lr by lr_gamma"),
        Option(
            "lr_gamma",
            "float",
            0.1,
            "lr decay factor of the step and plateau schedulers",
            min=0.0,
            max=1.0,
            min_exclusive=True,
        ),
        Option("lr_patience", "int", 5, "epochs without improvement before a plateau scheduler decays lr", min=0),
        Option(
            "lr_monitor",
            "str",
            "val",
            "accuracy a plateau scheduler watches: val (all seen classes: old-class images), val_new (the task's new "
            "classes only: data-free), test (the released code)",
            choices=("val", "val_new", "test"),
        ),
    ],
    scope="task",
)


def build_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """SGD or Adam over the method's parameter groups (a group may set its own lr, e.g. 0 for frozen rows)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config) -> Any:
    """The task's lr schedule, stepped once per epoch by the engine (plateau ones with the monitored accuracy)."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    if cfg.scheduler in ("plateau", "plateau_original"):
        mode = "max" if cfg.scheduler == "plateau" else "min"  # the original feeds accuracy to a 'min' scheduler
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg.lr_gamma, patience=cfg.lr_patience)
    return None
