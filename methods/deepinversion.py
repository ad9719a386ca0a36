"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"), the data-free comparator of CCSI.

No real image of an old class is kept, nor any per-class statistic or mean image. Before task t >= 2 the
frozen previous model is inverted: ``continual_class_specific_impression.synthesize`` optimises images
started from N(0, 1) noise (``syn_init: noise``) whose normalisation-layer moments match the layers'
running statistics (``class_stats: running``), as DeepInversion does; the configs set both keys (this
method refuses other values) and reuse CCSI's synthesis budget so that only init and targets differ.
Training mixes the new classes' real images with the synthetic ones (fraction ``di_syn_ratio`` synthetic) and
builds on LwF, as the paper's continual-learning experiment (Sec. 4.5) does: ``loss = CE(new-class logits,
real rows) + di_kd_weight * KD(old-class logits, teacher's logits, T)``, the KD (T = ``kd_temperature``) on
the synthetic and the real rows alike. ``di_synthetic_ce`` switches the CE to all rows over all seen classes,
the synthetic ones with their synthesis labels (the replay variant that later data-free work calls DeepInversion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import continual_class_specific_impression as ccsi_synthesis
import methods.memory  # noqa: F401  (declares kd_temperature, shared by the distillation methods)
from config import Config, ConfigError, Option, register_options
from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet
from methods import losses, register_method
from methods.base import Method, TaskContext

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
)


@register_method("deepinversion")
class DeepInversion(Method):
    """Replay of images inverted from the frozen previous model (noise init, running statistics) + distillation."""

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.teacher: nn.Module | None = None
        self.synthetic: ImageSet | None = None  # float images of old classes, never real ones
        self.n_old = 0
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W), all that synthesis needs to know

    def before_task(self, ctx: TaskContext) -> None:
        cfg = ctx.cfg
        if cfg.syn_init != "noise" or cfg.class_stats != "running":
            raise ConfigError(
                f"deepinversion synthesises from noise with the layers' running statistics: set syn_init: noise "
                f"and class_stats: running (got {cfg.syn_init}, {cfg.class_stats})"
            )
        self.n_old = ctx.n_old
        self.image_shape = tuple(ctx.train.x.shape[1:])
        self.teacher, self.synthetic = None, None
        if ctx.task > 1:
            self.teacher = self.net.copy_frozen()
            self.synthetic = self._invert(ctx)
        super().before_task(ctx)

    def _invert(self, ctx: TaskContext) -> ImageSet:
        """Images of every old class inverted from the teacher; the class memory holds only zero placeholders."""
        assert self.image_shape is not None and self.teacher is not None
        placeholder = ccsi_synthesis.ClassMemory()  # synthesize reads the image shape from it; noise init ignores it
        placeholder.add(torch.arange(ctx.n_old), torch.zeros((ctx.n_old, *self.image_shape)), [])
        return ccsi_synthesis.synthesize_for_task(self.teacher, placeholder, ctx, self.device)

    def replay(self, ctx: TaskContext) -> tuple[ImageSet | None, float]:
        return self.synthetic, ctx.cfg.di_syn_ratio

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        if self.teacher is None:
            ce = F.cross_entropy(logits, batch.y)
            return {"loss": ce, "ce": ce}
        cfg = self.cfg
        if cfg.di_synthetic_ce:  # replay variant: every row, all seen classes
            ce = F.cross_entropy(logits, batch.y)
        else:  # LwF's L_new: real rows, new classes' outputs
            per_sample = F.cross_entropy(logits[:, self.n_old :], (batch.y - self.n_old).clamp(min=0), reduction="none")
            ce = losses.masked_mean(per_sample, ~batch.synthetic)  # real rows (B,)
        with torch.no_grad():
            old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, cfg.kd_temperature)
        return {"loss": ce + cfg.di_kd_weight * kd, "ce": ce, "kd": kd}

    def after_task(self, ctx: TaskContext) -> None:
        self.teacher, self.synthetic = None, None  # regenerated from the next task's teacher
