"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou et al., CVPR 2019).

Cosine-normalised head; on task t >= 2, new-class weights are imprinted from the class-mean features (``imprint``),
the old-class weights stay fixed (``freeze_old_weights``, the code's lr 0), and the loss on new data + exemplars is
CE + less-forget distillation of the features (lamda * sqrt(n_old / n_new), base 5) + ``lw_mr`` * margin ranking
on the old-class samples (top-K = 2 new classes, margin 0.5). Memory: 20 herding exemplars per class
(``memory_per_class: 20`` in the configs). Not implemented: the optional class-balanced finetuning and the removal of
the backbone's last ReLU. The keys ``lamda``, ``adapt_lamda``, ``K``, ``dist``, ``lw_mr``, ``imprint`` and
``freeze_old_weights`` are CCSI's (declared in ``methods/ccsi.py``, whose defaults are CCSI's: K 1, dist 0.3); the
LUCIR configs set the paper's K: 2, dist: 0.5, lamda: 5.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from config import Config, ConfigError
from dataloaders.batches import Batch
from methods import losses, register_method
from methods.base import TaskContext
from methods.ccsi import less_forget_weight  # also declares the LUCIR keys shared with CCSI
from methods.memory import ReplayMethod, extract_features

log = logging.getLogger(__name__)


@register_method("lucir")
class LUCIR(ReplayMethod):
    """Cosine head with imprinting, less-forget feature distillation, margin ranking on exemplars."""

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        if cfg.head != "cosine":
            raise ConfigError(f"method 'lucir' needs head: cosine (its losses act on cosine scores), got {cfg.head}")
        super().__init__(cfg, net, device)
        self.lamda_t = 0.0  # less-forget weight of the current task
        self.k = 1  # margin ranking: hardest new classes per old-class sample

    def before_task(self, ctx: TaskContext) -> None:
        super().before_task(ctx)  # teacher snapshot, head growth
        if ctx.task == 1:
            return
        cfg = ctx.cfg
        if cfg.imprint:
            self.net.imprint(extract_features(self.net, ctx.train, cfg.eval_batch_size), ctx.train.y)
        self.net.freeze_old_classes(cfg.freeze_old_weights)
        self.lamda_t = less_forget_weight(cfg, ctx)
        self.k = min(cfg.K, ctx.n_new)
        if self.k < cfg.K:
            log.warning(
                "task %d has %d new classes: margin ranking uses K=%d instead of %d", ctx.task, ctx.n_new, self.k, cfg.K
            )

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        out = self.net(batch.x)
        ce = F.cross_entropy(out["logits"], batch.y)
        if self.teacher is None:
            return {"loss": ce, "ce": ce}
        with torch.no_grad():
            ref = self.teacher(batch.x)["features"]  # (B, D)
        distill = losses.less_forget(out["features"], ref, self.lamda_t)
        margin = losses.margin_ranking(out["scores"], batch.y, self.n_old, self.k, self.task_cfg.dist)
        loss = ce + distill + self.task_cfg.lw_mr * margin
        return {"loss": loss, "ce": ce, "distill": distill, "margin": margin}
