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
from typing import Any, ClassVar

import torch
from torch import nn

from dataloaders.batches import Batch, BatchLoader
from experiment.config import Config, ConfigError
from methods.base import Method, TaskContext
from methods.memory import RehearsalMemory
from methods.registry import register_method


@register_method("gdumb")
class GDumb(Method):
    """Class-balanced random memory; the net is retrained from its initial weights on the memory for every task."""

    requires: ClassVar[dict[str, Any]] = {"memory_selection": "random"}  # its greedy class-balanced sampler
    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.memory = self.add_part("memory", RehearsalMemory.from_config(cfg, device))
        self.initial_backbone = copy.deepcopy(net.backbone.state_dict())  # seeded by the engine: same on resume

    @classmethod
    def check(cls, cfg: Config, task_sizes: list[int]) -> None:
        """GDumb trains on the memory only: it must keep an exemplar of every class up to the last task."""
        if RehearsalMemory.from_config(cfg, "cpu").quota(sum(task_sizes)) < 1:
            raise ConfigError(
                f"key 'memory_size': gdumb trains on the memory only, which would be empty (memory_size="
                f"{cfg.memory_size}, memory_per_class={cfg.memory_per_class}, {sum(task_sizes)} classes in all)"
            )

    def before_task(self, ctx: TaskContext) -> None:
        self.memory.update(ctx.train, ctx.n_seen, ctx.generator)
        if self.memory.data() is None:
            raise ConfigError(
                f"key 'memory_size': gdumb trains on the memory only, which is empty (memory_size="
                f"{self.cfg.memory_size}, memory_per_class={self.cfg.memory_per_class})"
            )
        self.net.backbone.load_state_dict(self.initial_backbone)
        self.net.set_head_layout([ctx.n_seen])  # freshly initialised rows for every seen class

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        memory = self.memory.data()
        assert memory is not None
        return BatchLoader(
            memory,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            augment=self.cfg.augment,
            generator=ctx.generator,
            device=self.device,
        )
