"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"), the data-free comparator of CCSI.

No real image of an old class is kept, nor any per-class statistic or mean image. Before task t >= 2 the
frozen previous model is inverted with CCSI's synthesis (``methods.ccsi.replay_impressions``), started from
N(0, 1) noise (``syn_init: noise``) and matching the normalisation layers' running statistics
(``class_stats: running``), and clamping every channel to [0, 1] (``syn_clamp: unit``), as DeepInversion does:
these are this method's requirements, so that only init, targets and clamp differ from CCSI with the same budget.
Training mixes the new classes' real images with the synthetic ones (fraction ``di_syn_ratio`` synthetic) and
builds on LwF, as the paper's continual-learning experiment (Sec. 4.5) does: ``loss = CE(new-class logits,
real rows) + di_kd_weight * KD(old-class logits, teacher's logits, T)``, the KD (T = ``kd_temperature``) on
the synthetic and the real rows alike. ``di_synthetic_ce`` switches the CE to all rows over all seen classes,
the synthetic ones with their synthesis labels (the replay variant that later data-free work calls DeepInversion).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet
from experiment.config import Config, Option, register_options
from methods import losses
from methods.base import Method, TaskContext
from methods.ccsi import replay_impressions
from methods.registry import register_method

register_options(
    "deepinversion",
    [
        Option(
            "di_syn_ratio",
            "float",
            0.66,
            "fraction of synthetic samples in training batches (CCSI's rs_ratio, so that the two compare)",
            min=0.0,
            max=0.99,
        ),
        Option("di_kd_weight", "float", 1.0, "weight of the old-class distillation term (LwF's lambda_o = 1)", min=0.0),
        Option(
            "di_synthetic_ce",
            "bool",
            False,
            "CE on every row over all seen classes, synthetic rows with their synthesis labels (replay variant); "
            "false: CE on the real rows over the new classes (LwF)",
        ),
    ],
    scope="task",
)


@register_method("deepinversion")
class DeepInversion(Method):
    """Replay of images inverted from the frozen previous model (noise init, running statistics) + distillation."""

    needs_teacher = True
    requires: ClassVar[dict[str, Any]] = {"syn_init": "noise", "class_stats": "running", "syn_clamp": "unit"}

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.synthetic: ImageSet | None = None  # float images of old classes, never real ones

    def before_task(self, ctx: TaskContext) -> None:
        self.synthetic = None
        if ctx.task > 1:
            assert self.teacher is not None
            self.synthetic = replay_impressions(self.teacher, ctx, self.cfg, tuple(ctx.train.x.shape[1:]), None)
        super().before_task(ctx)

    def replay(self, ctx: TaskContext) -> tuple[ImageSet | None, float]:
        return self.synthetic, self.cfg.di_syn_ratio

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return super().training_step(batch)
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        cfg = self.cfg
        if cfg.di_synthetic_ce:  # replay variant: every row, all seen classes
            ce = F.cross_entropy(logits, batch.y)
        else:  # LwF's L_new: real rows, new classes' outputs
            per_sample = F.cross_entropy(logits[:, self.n_old :], (batch.y - self.n_old).clamp(min=0), reduction="none")
            ce = losses.masked_mean(per_sample, ~batch.synthetic, batch.shard)  # real rows (B,)
        with torch.no_grad():
            old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, cfg.kd_temperature)
        return {"loss": ce + cfg.di_kd_weight * kd, "ce": ce, "kd": kd}

    def after_task(self, ctx: TaskContext) -> None:
        self.synthetic = None  # regenerated from the next task's teacher
