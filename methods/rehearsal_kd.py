"""Rehearsal + knowledge distillation: the GTSRB notebook's exemplar baseline (WA's "CE + KD").

Cross-entropy over all seen classes on the new data joined with the memory (its configs keep 200 exemplars), plus
``losses.kd_loss`` between the old-class logits and the previous model's (T = ``kd_temperature``, 2), mixed as
``(1 - lambda) * CE + lambda * KD`` with the adaptive ``lambda = n_old / n_seen`` (BiC, Wu et al. 2019; WA, Zhao et
al. 2020). Whether the notebook also scaled CE by (1 - lambda) could not be checked here. Task 1 is plain CE.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch
from experiment.config import Config
from methods import losses
from methods.base import Method, TaskContext
from methods.memory import RehearsalMemory
from methods.registry import register_method


@register_method("rehearsal_kd")
class RehearsalKD(Method):
    """CE on new data + memory, KD on the old classes' logits weighted by the share of old classes."""

    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.memory = self.add_part("memory", RehearsalMemory.from_config(cfg, device))

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        return self.memory.loader(ctx.train, self.cfg, ctx.generator, self.device)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return super().training_step(batch)
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        ce = F.cross_entropy(logits, batch.y)
        with torch.no_grad():
            old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, self.cfg.kd_temperature)
        lam = self.n_old / self.n_seen
        return {"loss": (1.0 - lam) * ce + lam * kd, "ce": ce, "kd": kd}

    def after_task(self, ctx: TaskContext) -> None:
        self.memory.add_task(self.net, ctx.train, ctx.n_seen, ctx.generator, self.cfg.eval_batch_size)
