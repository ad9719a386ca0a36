"""CCSI: Continual Class-Specific Impression for data-free class-incremental learning.

Ayromlou, Tsang, Abolmaesumi, Li (arXiv 2406.05631; MICCAI 2022 "Class Impression"). No real image
of an old class is kept: after each task the method stores one mean image and the CN moments per
class; before the next task the frozen model turns those into synthetic "impressions" of every old
class, which are mixed with the new classes' real images (fraction ``rs_ratio`` synthetic).
Task 1: class-weighted CE. Tasks >= 2: LUCIR less-forget distillation (adaptive lambda) +
class-weighted cosine CE + margin ranking on old-class samples + intra-domain contrastive (IdC).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import continual_class_specific_impression as ccsi_synthesis
from config import Config, Option, register_options
from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet, as_float
from methods import losses, register_method
from methods.base import Method, TaskContext

register_options(
    "ccsi",
    [
        Option("lamda", "float", 5.0, "less-forget distillation weight (LUCIR; CCSI configs: 5)", min=0.0),
        Option("adapt_lamda", "bool", True, "scale lamda by sqrt(n_old / n_new) each task (LUCIR)"),
        Option(
            "lamda_new_classes",
            "str",
            "actual",
            "n_new in the adaptive lamda: actual = classes this task adds; nb_cl = the configured classes per task, "
            "as the released CCSI and LUCIR code (differs when the last task is smaller, e.g. OrganAMNIST task 4)",
            choices=("actual", "nb_cl"),
        ),
        Option("K", "int", 1, "margin ranking: number of hardest new classes per old-class sample (CCSI: 1)", min=1),
        Option("dist", "float", 0.3, "margin ranking: margin m (CCSI: 0.3)", min=0.0),
        Option("lw_mr", "float", 1.0, "margin ranking weight (CCSI: 1)", min=0.0),
        Option("da_coef", "float", 1.0, "IdC (intra-domain contrastive) weight; 0 disables it", min=0.0),
        Option(
            "ro",
            "float",
            0.9,
            "IdC: EMA weight of the current batch's class centroids",
            min=0.0,
            max=1.0,
            min_exclusive=True,
        ),
        Option("temprature", "float", 0.5, "IdC: softmax temperature tau (original key spelling)", min=1e-6),
        Option(
            "idc_source",
            "str",
            "val",
            "IdC unlabelled batches: test (the released code: leaks test images), val, or train (new real data)",
            choices=("test", "val", "train"),
        ),
        Option(
            "rs_ratio",
            "float",
            0.66,
            "fraction of synthetic samples in training batches (CCSI: 0.66)",
            min=0.0,
            max=0.99,
        ),
        Option("imprint", "bool", True, "imprint new-class weights from class-mean features (CCSI, LUCIR)"),
        Option("freeze_old_weights", "bool", True, "keep old-class classifier weights fixed (CCSI: lr 0)"),
    ],
)


def less_forget_weight(cfg: Config, ctx: TaskContext) -> float:
    """The task's less-forget weight: lamda, or lamda * sqrt(n_old / n_new) with ``adapt_lamda``."""
    if not cfg.adapt_lamda:
        return cfg.lamda
    return losses.adaptive_lambda(cfg.lamda, ctx.n_old, ctx.n_new if cfg.lamda_new_classes == "actual" else cfg.nb_cl)


@register_method("ccsi")
class CCSI(Method):
    """Data-free: old classes come back only as impressions synthesised from the frozen previous model."""

    def __init__(self, cfg: Config, net: torch.nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.memory = ccsi_synthesis.ClassMemory()  # class mean images + per-class CN moments, no real images
        self.teacher: torch.nn.Module | None = None
        self.synthetic: ImageSet | None = None
        self.class_weights: Tensor | None = None
        self.lamda_t = 0.0
        self.n_old = 0
        self.idc: losses.IntraDomainContrastive | None = None
        self.idc_pool: ImageSet | None = None
        self.generator: torch.Generator | None = None

    def reads_test_split(self, cfg: Config) -> bool:
        return cfg.idc_source == "test"

    # ----- task life cycle ---------------------------------------------------------------
    def before_task(self, ctx: TaskContext) -> None:
        cfg = ctx.cfg
        self.n_old, self.generator = ctx.n_old, ctx.generator
        self.teacher, self.synthetic, self.idc = None, None, None
        if ctx.task > 1:
            self.teacher = self.net.copy_frozen()
            self.synthetic = self._synthesise(ctx)
        self.net.expand_head(ctx.n_new)
        self.n_seen = ctx.n_seen
        if ctx.task > 1:
            if cfg.imprint:
                self._imprint(ctx.train)
            self.net.freeze_old_classes(cfg.freeze_old_weights)
            self.lamda_t = less_forget_weight(cfg, ctx)
            if cfg.da_coef > 0:
                self.idc = losses.IntraDomainContrastive(cfg.ro, cfg.temprature)
                self.idc_pool = {"test": ctx.test, "val": ctx.val, "train": ctx.train}[cfg.idc_source]
                if self.idc_pool is None or len(self.idc_pool) == 0:
                    raise ValueError(f"idc_source '{cfg.idc_source}' holds no image for task {ctx.task}")
        labels = ctx.train.y if self.synthetic is None else torch.cat([ctx.train.y, self.synthetic.y])
        counts = torch.bincount(labels, minlength=ctx.n_seen).float()
        self.class_weights = losses.class_balance_weights(counts).to(self.device)

    def _synthesise(self, ctx: TaskContext) -> ImageSet:
        """Impressions of every old class from the frozen teacher (regenerated each task)."""
        return ccsi_synthesis.synthesize_for_task(self.teacher, self.memory, ctx, self.device)

    @torch.no_grad()
    def _imprint(self, train: ImageSet) -> None:
        """New-class weights from the mean normalised feature of each new class (current model, eval mode)."""
        self.net.eval()
        bs = self.cfg.eval_batch_size
        feats = torch.cat([self.net.features(as_float(train.x[i : i + bs])) for i in range(0, len(train), bs)])
        self.net.imprint(feats, train.y)

    def replay(self, ctx: TaskContext) -> tuple[ImageSet | None, float]:
        return self.synthetic, ctx.cfg.rs_ratio

    def on_epoch_start(self, ctx: TaskContext, epoch: int) -> None:
        if self.idc is not None:
            self.idc.reset()  # the authors reset the IdC centroids every epoch

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        out = self.net(batch.x)
        ce = losses.weighted_cross_entropy(out["logits"], batch.y, self.class_weights)
        if self.teacher is None:
            return {"loss": ce, "ce": ce}
        with torch.no_grad():
            ref = self.teacher(batch.x)["features"]  # (B, D)
        terms = {
            "ce": ce,
            "distill": losses.less_forget(out["features"], ref, self.lamda_t),
            "margin": losses.margin_ranking(out["scores"], batch.y, self.n_old, self.cfg.K, self.cfg.dist),
        }
        loss = terms["ce"] + terms["distill"] + self.cfg.lw_mr * terms["margin"]
        if self.idc is not None:
            assert self.idc_pool is not None
            idx = batch.draw_rows(len(self.idc_pool), self.generator)  # (B,)
            target = as_float(self.idc_pool.x[idx.to(self.idc_pool.x.device)]).to(self.device)
            terms["idc"] = self.idc(out["scores"], batch.y, self.net(target)["scores"])
            loss = loss + self.cfg.da_coef * terms["idc"]
        return {"loss": loss, **terms}

    def after_task(self, ctx: TaskContext) -> None:
        """Keep what synthesis needs: the new classes' mean images and CN moments (no real image)."""
        self.net.eval()
        self.memory.add_task(self.net, ctx.train, batch_size=self.cfg.eval_batch_size, device=self.device)
        self.teacher, self.synthetic, self.idc, self.idc_pool = None, None, None, None

    # ----- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
        self.memory.to(self.device)
