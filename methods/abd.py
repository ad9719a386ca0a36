"""ABD: Always Be Dreaming (Smith et al., ICCV 2021), data-free class-incremental learning, as in its public code
(GT-RIPL/AlwaysBeDreaming-DFCIL, ``learners/datafree.py`` ``AlwaysBeDreaming``).

Before task t >= 2 a generator is trained by model inversion against the frozen previous model
(``methods.generator_inversion``; one generator kept and trained further each task, as the code does). Every
training step then draws as many synthetic images as the batch has real ones (labels: the teacher's argmax over the
old classes) and minimises, with class weights w = n_old / n_seen for old classes and 1 - n_old / n_seen for new:

- local CE: the real rows' CE over the new classes' outputs only, weighted, mean over real rows;
- head fine-tuning: CE of the head on detached features of all rows over all seen classes, weighted, mean over rows
  (only the head learns from it: the class-balanced head training of the paper);
- importance-weighted feature distillation: ``abd_kd_weight`` * mean_i ||W_old (f_i - f*_i)||^2 / n_old on all rows.

Task 1 is plain CE. No real image of an old class is read: only the teacher's weights and normalisation statistics.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch
from experiment.config import Config, Option, register_options
from methods import losses
from methods.base import Method, TaskContext
from methods.generator_inversion import InversionGenerator, draw_normal_rows
from methods.registry import register_method

log = logging.getLogger(__name__)

register_options(
    "abd",
    [
        Option(
            "abd_kd_weight",
            "float",
            0.1,
            "mu: weight of the importance-weighted feature distillation (ABD's CIFAR-100 scripts: 0.1)",
            min=0.0,
        ),
    ],
    scope="task",
)


def class_balance(labels: Tensor, n_old: int, n_seen: int) -> Tensor:
    """ABD's per-row CE weights (B,): n_old / n_seen for rows of old classes, 1 - n_old / n_seen for new ones."""
    ratio = n_old / n_seen
    old = (labels < n_old).to(torch.get_default_dtype())
    return old * ratio + (1 - old) * (1 - ratio)


def train_generator(inversion: InversionGenerator, teacher: nn.Module, ctx: TaskContext, cfg: Config) -> None:
    """Build (weights seeded from the task's stream) and train ``inversion`` against ``teacher``; log its terms."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    inversion.build(tuple(ctx.train.x.shape[1:]), seed)
    terms = inversion.train(teacher, ctx.n_old, cfg, ctx.generator)
    log.info("task %d: generator trained, last step %s", ctx.task, ", ".join(f"{k} {v:.4g}" for k, v in terms.items()))
    if ctx.log is not None:
        ctx.log.log_scalars({f"task{ctx.task}/generator_{k}": v for k, v in terms.items()}, None)


@register_method("abd")
class ABD(Method):
    """Generator inversion + local CE, importance-weighted feature KD, class-balanced head (Smith et al., ICCV 2021)."""

    needs_teacher = True
    requires: ClassVar[dict[str, Any]] = {"head": "linear"}  # the distillation goes through the old linear head

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.inversion = self.add_part("generator", InversionGenerator(cfg, device))  # kept across tasks
        self.rng: torch.Generator | None = None  # the task's random stream, for the synthetic codes

    def before_task(self, ctx: TaskContext) -> None:
        self.rng = ctx.generator
        if ctx.task > 1:
            assert self.teacher is not None
            train_generator(self.inversion, self.teacher, ctx, self.cfg)
        super().before_task(ctx)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return super().training_step(batch)
        assert self.rng is not None and self.inversion.net is not None
        n, n_old = len(batch), self.n_old
        z = draw_normal_rows(batch.shard, n, self.inversion.net.z_dim, self.rng)
        x_syn, y_syn = self.inversion.sample(self.teacher, z, n_old)  # (n, C, H, W), (n,)
        x, y = torch.cat([batch.x, x_syn]), torch.cat([batch.y, y_syn])  # real rows first
        out = self.net(x)
        features, logits = out["features"], out["logits"]  # (2n, D), (2n, n_seen)
        weights = class_balance(y, n_old, self.n_seen).to(logits)  # (2n,)
        local = (F.cross_entropy(logits[:n, n_old:], batch.y - n_old, reduction="none") * weights[:n]).mean()
        head_logits = self.net.head(features.detach())["logits"]  # (2n, n_seen): only the head learns
        head = (F.cross_entropy(head_logits, y, reduction="none") * weights).mean()
        with torch.no_grad():
            old_features = self.teacher(x)["features"]  # (2n, D)
        kd = losses.weighted_feature_kd(features, old_features, self.teacher.head.all_weights())
        return {"loss": local + head + self.cfg.abd_kd_weight * kd, "ce": local, "head_ce": head, "kd": kd}
