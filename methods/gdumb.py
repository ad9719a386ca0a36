"""GDumb: Greedy Sampler and Dumb Learner (Prabhu, Torr, Dokania, ECCV 2020).

No learning from the stream: before each task the new data only feed a class-balanced memory, then the network is
re-initialised (the same initial weights every task, a fresh head over all seen classes) and trained from scratch on
the memory alone; the engine's epoch loop does that training. GDumb's greedy sampler removes a random exemplar of the
largest class whenever the memory is full, so at the end of each task it holds a class-balanced random subset of each
class: ``memory_selection: random`` with ``memory_size // n_seen`` per class (the ``memory_size mod n_seen`` slots
the sampler could also fill stay empty). Not implemented: the paper's CutMix, gradient clipping and warm restarts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from config import Config, ConfigError
from dataloaders.batches import Batch, BatchLoader
from methods import register_method
from methods.base import Method, TaskContext
from methods.memory import RehearsalMemory


@register_method("gdumb")
class GDumb(Method):
    """Class-balanced random memory; the net is retrained from its initial weights on the memory for every task."""

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        if cfg.memory_selection != "random":
            raise ConfigError(
                f"method 'gdumb' keeps a class-balanced random memory (its greedy sampler): set memory_selection: "
                f"random, got {cfg.memory_selection}"
            )
        super().__init__(cfg, net, device)
        self.memory = RehearsalMemory.from_config(cfg, device)
        self.initial_backbone = copy.deepcopy(net.backbone.state_dict())  # seeded by the engine: same on resume

    def before_task(self, ctx: TaskContext) -> None:
        self.memory.update(ctx.train, ctx.n_seen, ctx.generator)
        if self.memory.data() is None:
            raise ConfigError(
                f"key 'memory_size': gdumb trains on the memory only, which is empty (memory_size="
                f"{ctx.cfg.memory_size}, memory_per_class={ctx.cfg.memory_per_class})"
            )
        self.net.backbone.load_state_dict(self.initial_backbone)
        self.net.set_head_layout([ctx.n_seen])  # freshly initialised rows for every seen class
        self.n_seen = ctx.n_seen

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        memory = self.memory.data()
        assert memory is not None
        return BatchLoader(
            memory,
            batch_size=ctx.cfg.batch_size,
            shuffle=True,
            augment=ctx.cfg.augment,
            generator=ctx.generator,
            device=self.device,
        )

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        ce = F.cross_entropy(logits, batch.y)
        return {"loss": ce, "ce": ce}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
