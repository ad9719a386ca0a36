"""WA: Maintaining Discrimination and Fairness in Class Incremental Learning (Zhao et al., CVPR 2020).

Training is rehearsal + KD (``RehearsalKD``: ``(1 - lambda) CE + lambda KD``, lambda = n_old / n_seen, T = 2, as in the
paper). Weight aligning after each task t >= 2 corrects the bias towards new classes: the new classes' weight
rows of the linear head are multiplied by gamma = mean ||w_old|| / mean ||w_new|| (biases are left alone, as in
PyCIL). With ``wa_clip_weights`` the head's weights are clamped to be non-negative after every optimiser step
(the paper's weight clipping), before aligning.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from experiment.config import Option, register_options
from methods.base import TaskContext
from methods.registry import register_method
from methods.rehearsal_kd import RehearsalKD
from models.layers.cosine_linear import IncrementalHead

log = logging.getLogger(__name__)

register_options(
    "wa",
    [
        Option("wa_clip_weights", "bool", True, "keep the linear head's weights >= 0 while training (WA paper: yes)"),
    ],
    scope="task",
)


@torch.no_grad()
def align_weights(head: IncrementalHead, n_old: int) -> float:
    """Scale the new-class weight rows of a two-block linear head by gamma = mean old row norm / mean new row norm.

    Returns gamma. The head must be laid out as [n_old, n_new] (old block first, as after ``expand``).
    """
    layout = head.layout()
    if head.kind != "linear" or len(layout) != 2 or layout[0] != n_old:
        raise ValueError(f"align_weights needs a linear head laid out [{n_old}, n_new], got {head.kind} {layout}")
    weights = head.all_weights()  # (n_seen, D)
    gamma = weights[:n_old].norm(dim=1).mean() / weights[n_old:].norm(dim=1).mean()
    head.fc.fc2.weight.mul_(gamma)
    return float(gamma)


@torch.no_grad()
def clip_weights(head: IncrementalHead) -> None:
    """Clamp every weight of a linear head to >= 0 in place (biases untouched)."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            module.weight.clamp_(min=0.0)


@register_method("wa")
class WA(RehearsalKD):
    """Rehearsal + KD, then weight aligning of the new classes' classifier rows after each incremental task."""

    requires: ClassVar[dict[str, Any]] = {"head": "linear"}  # it rescales linear weight rows

    def after_step(self) -> None:
        if self.cfg.wa_clip_weights:
            clip_weights(self.net.head)

    def after_task(self, ctx: TaskContext) -> None:
        if ctx.task > 1:
            gamma = align_weights(self.net.head, ctx.n_old)
            log.info("task %d: weight aligning gamma = %.4f", ctx.task, gamma)
            if ctx.log is not None:
                ctx.log.log_scalars({f"task{ctx.task}/wa_gamma": gamma}, None)
        super().after_task(ctx)  # memory update
