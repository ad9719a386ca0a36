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
    """SGD or Adam over the method's parameter groups (a group may set its own lr, e.g. 0 for frozen rows).

    SGD runs foreach (one call per operation over all parameters; bit-identical to the per-parameter loop on a
    CPU, torch's default on CUDA). ``compile: graphs``: each group's lr is a 0-d float64 tensor on its parameters'
    device (a captured step reads it, so a schedule changes it without a recompile; on a CPU the steps stay bit
    for bit those of a float lr) and Adam is ``capturable`` on CUDA (its step count stays on the device).
    """
    if cfg.compile == "graphs":
        groups = [{**group, "lr": lr_tensor(group.get("lr", cfg.lr), group["params"])} for group in groups]
    if cfg.optimizer == "adam":
        cuda = any(p.is_cuda for group in groups for p in group["params"])
        capturable = {"capturable": True} if cfg.compile == "graphs" and cuda else {}
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **capturable)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)


def lr_tensor(lr: float, params: list[torch.Tensor]) -> torch.Tensor:
    """``lr`` as a 0-d float64 tensor on the device of ``params`` (the CPU when there are none)."""
    device = params[0].device if params else torch.device("cpu")
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


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
