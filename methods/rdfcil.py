"""R-DFCIL: Relation-guided representation learning for data-free class-incremental learning (Gao et al., ECCV
2022), as in its public code (jianzhangcs/R-DFCIL ``module.py`` on cl_lite).

Before task t >= 2 a fresh generator is trained by model inversion against the frozen previous model
(``methods.generator_inversion``, the code shared with ABD). Every training step draws as many synthetic images as
the batch has real ones (labels: the teacher's argmax) and minimises, with alpha = log2(n_new / 2 + 1) and
beta = sqrt(n_old / n_new):

- local CE on the real rows over the new classes' outputs: ``rdfcil_ce_weight`` * (1 + 1 / alpha) / beta;
- hard KD: L1 between the old-class logits of the current and the previous model on the synthetic rows,
  ``rdfcil_hkd_weight`` * alpha * beta;
- relational KD: angle-wise RKD between the current and the previous model's features of the real rows, each
  through its own learned linear projection to 2 D dimensions, ``rdfcil_rkd_weight`` * alpha * beta.

At the end of each task t >= 2 the head is refitted for ``rdfcil_ft_epochs`` epochs on a frozen backbone at lr
``rdfcil_ft_lr``: class-balanced CE (w_c = n_max / n_c over the real and synthetic labels) over all seen classes on
real and synthetic rows, ``rdfcil_ce_weight`` times, plus the hard KD. Task 1 is plain CE.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch, BatchLoader
from experiment.config import Config, Option, register_options
from methods import losses
from methods.abd import train_generator
from methods.base import Method, TaskContext
from methods.generator_inversion import InversionGenerator, draw_normal_rows
from methods.registry import register_method

log = logging.getLogger(__name__)

register_options(
    "rdfcil",
    [
        Option("rdfcil_ce_weight", "float", 0.5, "lambda_ce: weight of the CE terms (R-DFCIL's code: 0.5)", min=0.0),
        Option("rdfcil_hkd_weight", "float", 0.15, "lambda_hkd: weight of the L1 logit KD (code: 0.15)", min=0.0),
        Option("rdfcil_rkd_weight", "float", 0.5, "lambda_rkd: weight of the relational KD (code: 0.5)", min=0.0),
        Option(
            "rdfcil_ft_epochs",
            "int",
            40,
            "epochs of the class-balanced head refit after each task >= 2 (code: the last 40 of 200 epochs)",
            min=0,
        ),
        Option("rdfcil_ft_lr", "float", 0.005, "learning rate of the head refit (code: 0.005)", min=0.0),
    ],
    scope="task",
)


def loss_factors(n_old: int, n_new: int) -> tuple[float, float]:
    """R-DFCIL's (CE factor (1 + 1 / alpha) / beta, KD factor alpha * beta), alpha = log2(n_new / 2 + 1),
    beta = sqrt(n_old / n_new), before the lambdas."""
    if n_old < 1 or n_new < 1:
        raise ValueError(f"loss_factors needs n_old >= 1 and n_new >= 1, got n_old={n_old}, n_new={n_new}")
    alpha = math.log2(n_new / 2 + 1)
    beta = math.sqrt(n_old / n_new)
    return (1 + 1 / alpha) / beta, alpha * beta


class RelationProjection(nn.Module):
    """The learned projections of R-DFCIL's RKD: student and teacher features (B, D) -> (B, 2 D) each."""

    def __init__(self, dim: int):
        super().__init__()
        self.student = nn.Linear(dim, 2 * dim)
        self.teacher = nn.Linear(dim, 2 * dim)


@register_method("rdfcil")
class RDFCIL(Method):
    """Generator inversion + local CE, L1 logit KD on synthetic, relational KD, head refit (Gao et al., ECCV 2022)."""

    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}  # the code's linear classifier

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.inversion: InversionGenerator | None = None  # a fresh generator per task
        self.rng: torch.Generator | None = None

    def before_task(self, ctx: TaskContext) -> None:
        self.rng = ctx.generator
        self.inversion = None
        if ctx.task > 1:
            assert self.teacher is not None
            self.inversion = InversionGenerator(self.cfg, self.device)
            train_generator(self.inversion, self.teacher, ctx, self.cfg)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                # a submodule of the net for the task, so that the engine's optimiser trains it (as the code does)
                self.net.rkd_projection = RelationProjection(self.net.feature_dim).to(self.device)
        super().before_task(ctx)

    def _synthetic(self, shard: Any, n: int) -> tuple[Tensor, Tensor]:
        assert self.rng is not None and self.inversion is not None and self.inversion.net is not None
        assert self.teacher is not None
        z = draw_normal_rows(shard, n, self.inversion.net.z_dim, self.rng)
        return self.inversion.sample(self.teacher, z, self.n_old)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return super().training_step(batch)
        cfg, n_old = self.cfg, self.n_old
        ce_factor, kd_factor = loss_factors(n_old, self.n_seen - n_old)
        x_syn, _ = self._synthetic(batch.shard, len(batch))  # (n, C, H, W)
        out = self.net(batch.x)  # real and synthetic rows in separate forwards, as the code
        ce = F.cross_entropy(out["logits"][:, n_old:], batch.y - n_old)
        syn_logits = self.net(x_syn)["logits"][:, :n_old]  # (n, n_old)
        with torch.no_grad():
            old_syn = self.teacher(x_syn)["logits"]  # (n, n_old)
            old_features = self.teacher(batch.x)["features"]  # (n, D)
        hkd = F.l1_loss(syn_logits, old_syn)
        projection = self.net.rkd_projection
        rkd = losses.rkd_angle(projection.student(out["features"]), projection.teacher(old_features), batch.shard)
        loss = (
            cfg.rdfcil_ce_weight * ce_factor * ce
            + cfg.rdfcil_hkd_weight * kd_factor * hkd
            + cfg.rdfcil_rkd_weight * kd_factor * rkd
        )
        return {"loss": loss, "ce": ce, "hkd": hkd, "rkd": rkd}

    def after_task(self, ctx: TaskContext) -> None:
        if ctx.task > 1:
            del self.net.rkd_projection  # the projection lives for one task (the code makes a new one per task)
            if self.cfg.rdfcil_ft_epochs > 0:
                self.refit_head(ctx)
        self.inversion = None

    def refit_head(self, ctx: TaskContext) -> None:
        """Class-balanced CE + hard KD on the head only, backbone frozen in eval mode (run identically on every
        rank under torchrun: the whole task data, the same draws)."""
        assert self.teacher is not None and self.inversion is not None and self.inversion.net is not None
        cfg, n_old, n_seen = self.cfg, self.n_old, self.n_seen
        _, kd_factor = loss_factors(n_old, n_seen - n_old)
        z = torch.randn(len(ctx.train), self.inversion.net.z_dim, generator=ctx.generator)
        syn_labels = torch.cat([self.inversion.sample(self.teacher, part, n_old)[1] for part in z.split(256)])
        counts = torch.bincount(torch.cat([ctx.train.y.cpu(), syn_labels.cpu()]), minlength=n_seen)  # (n_seen,)
        weights = losses.class_balance_weights(counts.float()).to(self.device)
        head_params = [p for p in self.net.head.parameters()]
        opt = torch.optim.SGD(head_params, lr=cfg.rdfcil_ft_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.net.eval()
        self.net.head.train()
        for _ in range(cfg.rdfcil_ft_epochs):
            loader = BatchLoader(
                ctx.train,
                cfg.batch_size,
                shuffle=True,
                augment=cfg.augment,
                generator=ctx.generator,
                device=self.device,
            )
            for batch in loader:
                ctx.access.record("train_batches", batch.y, ~batch.synthetic)
                x_syn, y_syn = self._synthetic(batch.shard, len(batch))
                with torch.no_grad():
                    features = self.net.features(torch.cat([batch.x, x_syn]))  # (2n, D)
                    old_syn = self.teacher(x_syn)["logits"]  # (n, n_old)
                logits = self.net.head(features)["logits"]  # (2n, n_seen)
                ce = F.cross_entropy(logits, torch.cat([batch.y, y_syn]), weight=weights)
                hkd = F.l1_loss(logits[len(batch) :, :n_old], old_syn)
                loss = cfg.rdfcil_ce_weight * ce + cfg.rdfcil_hkd_weight * kd_factor * hkd
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.net.train()
