"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), class-incremental form.

Data-free: no exemplar is kept. On task t >= 2 the loss on a batch of new-class images is
``CE(new-class logits, y - n_old) + lwf_lambda * KD(old-class logits, frozen previous model's logits, T)``.
The cross-entropy covers only the new classes' outputs, as the paper's L_new (the new task has its own
outputs) and PyCIL's ``models/lwf.py``; the distillation is ``losses.kd_loss`` (Hinton KD, T = ``kd_temperature``,
paper T = 2). Task 1 is plain cross-entropy.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dataloaders.batches import Batch
from experiment.config import Option, register_options
from methods import losses
from methods.base import Method
from methods.registry import register_method

register_options(
    "lwf",
    [
        Option(
            "lwf_lambda",
            "float",
            1.0,
            "weight of the old-class distillation term (paper: lambda_o = 1; PyCIL's CIFAR-100 setting: 3)",
            min=0.0,
        ),
    ],
    scope="task",
)


@register_method("lwf")
class LwF(Method):
    """Distil the previous model's old-class logits on the new data; no memory of old images."""

    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}  # the paper's linear classifier

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return super().training_step(batch)
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        ce = F.cross_entropy(logits[:, self.n_old :], batch.y - self.n_old)
        with torch.no_grad():
            old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, self.cfg.kd_temperature)
        return {"loss": ce + self.cfg.lwf_lambda * kd, "ce": ce, "kd": kd}
