"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi et al., CVPR 2017).

Training on the new data joined with the herding memory. Loss ``icarl_loss``:
- ``bce`` (the paper's Alg. 3, default): sigmoid binary cross-entropy over all seen classes, targets one-hot for the
  new classes and the previous model's sigmoid outputs for the old classes (for every sample, exemplars included),
  averaged over samples and classes as in the authors' code;
- ``kd`` (PyCIL's ``models/icarl.py``): softmax cross-entropy + ``losses.kd_loss`` on the old-class logits (T =
  ``kd_temperature``, 2), weight 1.
Classification (``predict``) is the nearest mean of exemplars (NME): L2-normalised features against the normalised
mean of each class's normalised exemplar features; before the means exist (during a task's training, e.g. for
model selection) the network's own logits are used. Means use the exemplars only (no flipped copies).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch
from experiment.config import Config, ConfigError, Option, register_options
from methods import losses
from methods.base import Method, TaskContext, extract_features
from methods.memory import RehearsalMemory
from methods.registry import register_method

register_options(
    "icarl",
    [
        Option(
            "icarl_loss",
            "str",
            "bce",
            "iCaRL's loss: bce (paper: sigmoid BCE with old-class targets from the previous model) or kd "
            "(PyCIL: CE + softmax KD on old logits)",
            choices=("bce", "kd"),
        ),
    ],
    scope="task",
)


def class_means(features: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """iCaRL class prototypes (n_classes, D): normalise(mean of normalised features) per class; labels (N,)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"class_means: expected features (N, D) and labels (N,), got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    counts = torch.bincount(labels, minlength=n_classes)  # (n_classes,)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class_means: no exemplar of classes {missing}; raise memory_size or memory_per_class")
    f = F.normalize(features.float(), dim=1)
    sums = torch.zeros(n_classes, f.shape[1], device=f.device).index_add_(0, labels.to(f.device), f)
    return F.normalize(sums / counts.to(f.device).unsqueeze(1), dim=1)


def nme_logits(features: Tensor, means: Tensor) -> Tensor:
    """Minus the squared distance (B, C) of normalised features (B, D) to the class means (C, D): argmax = NME."""
    f = F.normalize(features.float(), dim=1)
    sq = f.pow(2).sum(1, keepdim=True) - 2.0 * f @ means.t() + means.pow(2).sum(1)  # (B, C)
    return -sq


@register_method("icarl")
class ICaRL(Method):
    """Herding memory, distillation from the previous model, nearest-mean-of-exemplars classification."""

    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.memory = self.add_part("memory", RehearsalMemory.from_config(cfg, device))
        self.means: Tensor | None = None  # (n_seen, D) exemplar means, set after each task

    @classmethod
    def check(cls, cfg: Config, task_sizes: list[int]) -> None:
        """The nearest-mean classifier needs an exemplar of every class after every task."""
        if cfg.memory_selection == "reservoir":
            return
        for task in range(1, len(task_sizes) + 1):
            task_cfg, n_seen = cfg.for_task(task), sum(task_sizes[:task])
            quota = RehearsalMemory.from_config(task_cfg, "cpu").quota(n_seen)
            if quota < 1:
                raise ConfigError(
                    f"key 'memory_size': iCaRL's nearest-mean classifier needs an exemplar of every class, but "
                    f"memory_size={task_cfg.memory_size}, memory_per_class={task_cfg.memory_per_class} leave none per "
                    f"class for {n_seen} classes (task {task})"
                )

    def before_task(self, ctx: TaskContext) -> None:
        super().before_task(ctx)
        self.means = None  # stale: the representation is about to change and new classes have none

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        return self.memory.loader(ctx.train, self.cfg, ctx.generator, self.device)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        old_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                old_logits = self.teacher(batch.x)["logits"]  # (B, n_old)
        if self.cfg.icarl_loss == "bce":
            targets = F.one_hot(batch.y, logits.shape[1]).to(logits.dtype)  # (B, n_seen)
            if old_logits is not None:
                targets[:, : self.n_old] = torch.sigmoid(old_logits)
            bce = F.binary_cross_entropy_with_logits(logits, targets)
            return {"loss": bce, "bce": bce}
        ce = F.cross_entropy(logits, batch.y)
        if old_logits is None:
            return {"loss": ce, "ce": ce}
        kd = losses.kd_loss(logits[:, : self.n_old], old_logits, self.cfg.kd_temperature)
        return {"loss": ce + kd, "ce": ce, "kd": kd}

    def after_task(self, ctx: TaskContext) -> None:
        self.memory.add_task(self.net, ctx.train, ctx.n_seen, ctx.generator, self.cfg.eval_batch_size)
        counts = self.memory.class_counts(ctx.n_seen)
        exemplars = self.memory.data()
        if exemplars is None or bool((counts == 0).any()):  # reservoir sampling may miss a class
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ConfigError(
                f"key 'memory_size': iCaRL's nearest-mean classifier needs an exemplar of every class, but "
                f"memory_size={self.cfg.memory_size}, memory_per_class={self.cfg.memory_per_class} leave classes "
                f"{missing} without one after task {ctx.task}"
            )
        feats = extract_features(self.net, exemplars, self.cfg.eval_batch_size)
        self.means = class_means(feats, exemplars.y, ctx.n_seen)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        if self.means is None:
            return self.net(x)["logits"]
        return nme_logits(self.net.features(x), self.means)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "means": self.means}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.means = None if state["means"] is None else state["means"].to(self.device)
