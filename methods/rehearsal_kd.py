"""Rehearsal + knowledge distillation: the GTSRB notebook's exemplar baseline (WA's "CE + KD").

Cross-entropy over all seen classes on the new data joined with the memory (its configs keep 200 exemplars), plus
``losses.kd_loss`` between the old-class logits and the previous model's (T = ``kd_temperature``, 2), mixed as
``(1 - lambda) * CE + lambda * KD`` with the adaptive ``lambda = n_old / n_seen`` (BiC, Wu et al. 2019; WA, Zhao et
al. 2020). Whether the notebook also scaled CE by (1 - lambda) could not be checked here. Task 1 is plain CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dataloaders.batches import Batch
from methods import losses, register_method
from methods.memory import ReplayMethod


@register_method("rehearsal_kd")
class RehearsalKD(ReplayMethod):
    """CE on new data + memory, KD on the old classes' logits weighted by the share of old classes."""

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        ce = F.cross_entropy(logits, batch.y)
        if self.teacher is None:
            return {"loss": ce, "ce": ce}
        with torch.no_grad():
            old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, self.task_cfg.kd_temperature)
        lam = self.n_old / self.n_seen
        return {"loss": (1.0 - lam) * ce + lam * kd, "ce": ce, "kd": kd}
