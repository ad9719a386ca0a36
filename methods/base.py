"""The interface between the engine and a continual-learning method.

The engine (``incremental_train_and_eval.py``) drives every method the same way, per task:

1. ``before_task(ctx)``: grow the head, snapshot the teacher, prepare memory or replay data.
2. ``parameter_groups(ctx)`` -> optimiser parameter groups (the engine builds the optimiser).
3. per epoch: ``on_epoch_start(epoch)``, then for every ``batch`` of ``train_batches(ctx, epoch)``:
   ``training_step(batch)`` -> dict of named loss terms with the total under ``"loss"``; the
   engine does backward and the optimiser step, then calls ``after_step()``.
4. evaluation with ``predict(x)`` (logits over the classes seen so far).
5. ``after_task(ctx)``: herding, weight aligning, class statistics, ...

A method never sees old classes' real training images unless it sets ``uses_old_data``
(the ``joint`` upper bound): ``ctx.train`` holds only the current task's classes.
Methods declare their configuration keys with ``config.register_options`` in their module and
register themselves with ``@register_method(name)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from config import Config
from dataloaders.batches import Batch, BatchLoader
from dataloaders.image_set import ImageSet


@dataclass
class TaskContext:
    """What a method is told about the task being learned (labels are class-order positions)."""

    task: int  # 1-based task number
    cfg: Config  # configuration in force for this task (per_task values applied)
    new_classes: list[int]  # labels learned in this task, contiguous: range(n_old, n_seen)
    n_old: int  # number of classes learned before this task
    train: ImageSet  # training images of this task's classes (all seen classes if uses_old_data)
    val: ImageSet  # validation images of all classes seen so far (may be empty)
    test: ImageSet | None  # test images of seen classes: given only when the protocol allows it
    device: torch.device
    output_dir: Path
    generator: torch.Generator  # the task's seeded random stream for sampling and augmentation
    log: Any = None  # run logger (metrics/images), see loggers.py; may be None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_seen(self) -> int:
        return self.n_old + len(self.new_classes)

    @property
    def n_new(self) -> int:
        return len(self.new_classes)


class Method:
    """Base class: plain supervised training of ``self.net`` on the batches it is given."""

    uses_old_data: bool = False  # True only for upper bounds that may train on old real data

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        self.cfg = cfg  # the engine replaces it by the task's config (per_task applied) before before_task
        self.net = net
        self.device = device
        self.n_seen = 0  # classes seen so far, including the task being learned

    def reads_test_split(self, cfg: Config) -> bool:
        """Whether this method uses test images during training (only the original protocol's IdC does)."""
        return False

    # ----- task life cycle ---------------------------------------------------------------
    def before_task(self, ctx: TaskContext) -> None:
        """Grow the head for the new classes."""
        self.net.expand_head(ctx.n_new)
        self.n_seen = ctx.n_seen

    def parameter_groups(self, ctx: TaskContext) -> list[dict[str, Any]]:
        """Optimiser parameter groups; default: every trainable parameter of the net."""
        return [{"params": [p for p in self.net.parameters() if p.requires_grad]}]

    def replay(self, ctx: TaskContext) -> tuple[ImageSet | None, float]:
        """Images mixed into the task's batches and their fraction of draws; default: none."""
        return None, 0.0

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        """The batches of one epoch: the task's real data, shuffled, mixed with ``replay(ctx)`` if any."""
        images, ratio = self.replay(ctx)
        return BatchLoader(
            ctx.train,
            batch_size=ctx.cfg.batch_size,
            shuffle=True,
            augment=ctx.cfg.augment,
            generator=ctx.generator,
            device=self.device,
            synthetic=images,
            synthetic_ratio=ratio,
        )

    def on_epoch_start(self, ctx: TaskContext, epoch: int) -> None:
        """Called before each epoch's first batch (0-based epoch)."""

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        """Loss terms for one batch; ``"loss"`` is the one the engine back-propagates."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to project weights back onto a constraint)."""

    def after_task(self, ctx: TaskContext) -> None:
        """Called after the task's training and model selection, before evaluation."""

    # ----- inference -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, n_seen) over the classes seen so far, for float images in [0, 1]."""
        return self.net(x)["logits"]

    def train(self) -> None:
        self.net.train()

    def eval(self) -> None:
        self.net.eval()

    # ----- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the current task (net layout included)."""
        return {"net": self.net.state_dict(), "head_layout": self.net.head_layout(), "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.set_head_layout(state["head_layout"])
        self.net.load_state_dict(state["net"])
        self.n_seen = state["n_seen"]
