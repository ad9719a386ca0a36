"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), class-incremental form.

Data-free: no exemplar is kept. On task t >= 2 the loss on a batch of new-class images is
``CE(new-class logits, y - n_old) + lwf_lambda * KD(old-class logits, frozen previous model's logits, T)``.
The cross-entropy covers only the new classes' outputs, as the paper's L_new (the new task has its own
outputs) and PyCIL's ``models/lwf.py``; the distillation is ``losses.kd_loss`` (Hinton KD, T = ``kd_temperature``,
paper T = 2). Task 1 is plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import methods.memory  # noqa: F401  (declares kd_temperature, shared by the distillation methods)
from config import Config, Option, register_options
from dataloaders.batches import Batch
from methods import losses, register_method
from methods.base import Method, TaskContext

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
)


@register_method("lwf")
class LwF(Method):
    """Distil the previous model's old-class logits on the new data; no memory of old images."""

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.teacher: nn.Module | None = None  # frozen previous model, None on the first task
        self.n_old = 0

    def before_task(self, ctx: TaskContext) -> None:
        self.teacher = self.net.copy_frozen() if ctx.task > 1 else None
        self.n_old = ctx.n_old
        super().before_task(ctx)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        if self.teacher is None:
            ce = F.cross_entropy(logits, batch.y)
            return {"loss": ce, "ce": ce}
        ce = F.cross_entropy(logits[:, self.n_old :], batch.y - self.n_old)
        with torch.no_grad():
            old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, self.cfg.kd_temperature)
        return {"loss": ce + self.cfg.lwf_lambda * kd, "ce": ce, "kd": kd}

    def after_task(self, ctx: TaskContext) -> None:
        self.teacher = None  # the next task snapshots the model it starts from
