"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou et al., CVPR 2019).

Cosine-normalised head; on task t >= 2, new-class weights are imprinted from the class-mean features (``imprint``),
the old-class weights stay fixed (``freeze_old_weights``, the code's lr 0), and the loss on new data + exemplars is
CE + less-forget distillation of the features (lamda * sqrt(n_old / n_new), base 5) + ``lw_mr`` * margin ranking
on the old-class samples (top-K = 2 new classes, margin 0.5). Memory: 20 herding exemplars per class. Not
implemented: the optional class-balanced finetuning and the removal of the backbone's last ReLU.

This module owns the keys of LUCIR's components (less-forget distillation, margin ranking, imprinting, frozen
old-class weights), with the paper's defaults; CCSI builds on the same components and sets its own values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet
from experiment.config import Config, Option, register_options
from methods import losses
from methods.base import Method, TaskContext, extract_features
from methods.memory import RehearsalMemory
from methods.registry import register_method

log = logging.getLogger(__name__)

register_options(
    "lucir",
    [
        Option("lamda", "float", 5.0, "less-forget distillation weight (LUCIR and CCSI: 5)", min=0.0),
        Option("adapt_lamda", "bool", True, "scale lamda by sqrt(n_old / n_new) each task (LUCIR)"),
        Option(
            "lamda_new_classes",
            "str",
            "actual",
            "n_new in the adaptive lamda: actual = classes this task adds; nb_cl = the configured classes per task, "
            "as the released CCSI and LUCIR code (differs when the last task is smaller, e.g. OrganAMNIST task 4)",
            choices=("actual", "nb_cl"),
        ),
        Option("K", "int", 2, "margin ranking: number of hardest new classes per old-class sample (LUCIR: 2)", min=1),
        Option("dist", "float", 0.5, "margin ranking: margin m (LUCIR: 0.5)", min=0.0),
        Option("lw_mr", "float", 1.0, "margin ranking weight (LUCIR, CCSI: 1)", min=0.0),
        Option("imprint", "bool", True, "imprint new-class weights from class-mean features (LUCIR, CCSI)"),
        Option("freeze_old_weights", "bool", True, "keep old-class classifier weights fixed (LUCIR, CCSI: lr 0)"),
    ],
    scope="task",
)


def less_forget_weight(cfg: Config, n_old: int, n_new: int) -> float:
    """The task's less-forget weight: lamda, or lamda * sqrt(n_old / n_new) with ``adapt_lamda``."""
    if not cfg.adapt_lamda:
        return cfg.lamda
    return losses.adaptive_lambda(cfg.lamda, n_old, n_new if cfg.lamda_new_classes == "actual" else cfg.nb_cl)


def prepare_cosine_head(net: nn.Module, train: ImageSet, cfg: Config) -> None:
    """Imprint the new classes' weights from the current model's features (``imprint``) and freeze the old block."""
    if cfg.imprint:
        net.imprint(extract_features(net, train, cfg.eval_batch_size), train.y)
    net.freeze_old_classes(cfg.freeze_old_weights)


@register_method("lucir")
class LUCIR(Method):
    """Cosine head with imprinting, less-forget feature distillation, margin ranking on exemplars."""

    needs_teacher = True
    requires: ClassVar[dict[str, Any]] = {"head": "cosine"}  # its losses act on cosine scores
    defaults: ClassVar[dict[str, Any]] = {"memory_per_class": 20, "memory_selection": "herding"}

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.memory = self.add_part("memory", RehearsalMemory.from_config(cfg, device))
        self.lamda_t = 0.0  # less-forget weight of the current task
        self.k = 1  # margin ranking: hardest new classes per old-class sample

    def before_task(self, ctx: TaskContext) -> None:
        super().before_task(ctx)  # head growth
        if ctx.task == 1:
            return
        prepare_cosine_head(self.net, ctx.train, self.cfg)
        self.lamda_t = less_forget_weight(self.cfg, ctx.n_old, ctx.n_new)
        self.k = min(self.cfg.K, ctx.n_new)
        if self.k < self.cfg.K:
            log.warning(
                "task %d has %d new classes: margin ranking uses K=%d instead of %d",
                ctx.task,
                ctx.n_new,
                self.k,
                self.cfg.K,
            )

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        return self.memory.loader(ctx.train, self.cfg, ctx.generator, self.device)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return super().training_step(batch)
        out = self.net(batch.x)
        ce = F.cross_entropy(out["logits"], batch.y)
        with torch.no_grad():
            ref = self.teacher(batch.x)["features"]  # (B, D)
        distill = losses.less_forget(out["features"], ref, self.lamda_t)
        margin = losses.margin_ranking(out["scores"], batch.y, self.n_old, self.k, self.cfg.dist, batch.shard)
        loss = ce + distill + self.cfg.lw_mr * margin
        return {"loss": loss, "ce": ce, "distill": distill, "margin": margin}

    def after_task(self, ctx: TaskContext) -> None:
        self.memory.add_task(self.net, ctx.train, ctx.n_seen, ctx.generator, self.cfg.eval_batch_size)
