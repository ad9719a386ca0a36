"""The class-incremental split: a class order cut into tasks, and seeded stratified splits of a data set.

Labels used by the engine and the methods are class-order *positions*: original label ``y`` becomes
the position of ``y`` in ``class_order``, so task ``t`` learns the contiguous labels
``range(n_old(t), n_seen(t))``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from experiment.config import ConfigError, few


def _permutation_problem(order: list[int], num_classes: int) -> str:
    """Why ``order`` is not a permutation of 0..C-1: the classes it misses, repeats or names outside the range."""
    counts = Counter(order)
    repeated = sorted(c for c, n in counts.items() if n > 1)
    missing = sorted(set(range(num_classes)) - counts.keys())
    outside = sorted(c for c in counts if not 0 <= c < num_classes)
    parts = [
        f"{name} {few(values)}"
        for name, values in (("missing", missing), ("repeated", repeated), ("outside the range", outside))
        if values
    ]
    return f"must be a permutation of 0..{num_classes - 1} (each of the {num_classes} classes once): " + "; ".join(
        parts
    )


@dataclass
class Scenario:
    """Class order (original labels, learning order) and the number of classes of each task."""

    class_order: list[int]
    task_sizes: list[int]

    def __post_init__(self) -> None:
        self.class_order = [int(c) for c in self.class_order]
        self.task_sizes = [int(s) for s in self.task_sizes]
        if sorted(self.class_order) != list(range(len(self.class_order))):
            raise ValueError(
                f"class_order must be a permutation of 0..{len(self.class_order) - 1}, got {self.class_order}"
            )
        if not self.task_sizes or min(self.task_sizes) < 1 or sum(self.task_sizes) != len(self.class_order):
            raise ValueError(
                f"task_sizes {self.task_sizes} must be positive and sum to the {len(self.class_order)} classes"
            )

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def _check_task(self, task: int) -> None:
        if not 1 <= task <= self.num_tasks:
            raise ValueError(f"task must be in 1..{self.num_tasks}, got {task}")

    def n_old(self, task: int) -> int:
        """Number of classes learned before ``task`` (1-based)."""
        self._check_task(task)
        return sum(self.task_sizes[: task - 1])

    def n_seen(self, task: int) -> int:
        """Number of classes learned up to and including ``task`` (1-based)."""
        self._check_task(task)
        return sum(self.task_sizes[:task])

    def classes_of_task(self, task: int) -> list[int]:
        """Remapped labels learned in ``task`` (1-based): a contiguous range."""
        return list(range(self.n_old(task), self.n_seen(task)))

    def remap(self, y: Tensor) -> Tensor:
        """Original labels -> class-order positions (same shape and device)."""
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got range {int(y.min())}..{int(y.max())}")
        position = torch.empty(self.num_classes, dtype=torch.long)
        position[torch.tensor(self.class_order)] = torch.arange(self.num_classes)  # (C,)
        return position.to(y.device)[y.long()]

    @staticmethod
    def build(
        num_classes: int,
        nb_cl_fg: int,
        nb_cl: int,
        class_order: Sequence[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Scenario:
        """First task ``nb_cl_fg`` classes, then ``nb_cl`` per task; the last task takes the remainder.

        The order is ``class_order`` if given, else a seeded shuffle of 0..C-1 if ``shuffle``, else 0..C-1.
        Raises ConfigError for keys inconsistent with the data set.
        """
        if nb_cl_fg < 1 or nb_cl < 1:
            raise ConfigError(f"nb_cl_fg and nb_cl must be >= 1, got nb_cl_fg={nb_cl_fg}, nb_cl={nb_cl}")
        if nb_cl_fg > num_classes:
            raise ConfigError(
                f"key 'nb_cl_fg': {nb_cl_fg} classes in the first task, but the data set has {num_classes}; "
                f"set nb_cl_fg <= {num_classes}"
            )
        if class_order is not None:
            if shuffle:
                raise ConfigError("keys 'class_order' and 'shuffle_classes: true' exclude each other; set only one")
            order = [int(c) for c in class_order]
            if sorted(order) != list(range(num_classes)):
                raise ConfigError(f"key 'class_order': {_permutation_problem(order, num_classes)}")
        elif shuffle:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(num_classes, generator=g).tolist()
        else:
            order = list(range(num_classes))
        rest = num_classes - nb_cl_fg
        sizes = [nb_cl_fg] + [nb_cl] * (rest // nb_cl) + ([rest % nb_cl] if rest % nb_cl else [])
        return Scenario(order, sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"class_order": list(self.class_order), "task_sizes": list(self.task_sizes)}

    @staticmethod
    def from_dict(state: dict[str, Any]) -> Scenario:
        return Scenario(list(state["class_order"]), list(state["task_sizes"]))


def stratified_split(y: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Split indices of ``y`` into len(fractions) parts, per class, at random (seeded).

    Part k > 0 gets round(fractions[k] * n_c) images of each class c; part 0 gets the rest.
    Returns sorted int64 index tensors.
    """
    if any(f < 0 for f in fractions) or sum(fractions[1:]) > 1:
        raise ValueError(f"fractions must be >= 0 with the later ones summing to <= 1, got {list(fractions)}")
    y = y.cpu().long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    order = perm[torch.argsort(y[perm], stable=True)]  # (N,) grouped by class, random within class
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if len(y) else 0)  # (C,)
    starts = torch.cumsum(counts, 0) - counts
    labels = y[order]
    rank = torch.arange(len(y)) - starts[labels]  # (N,) position within its class
    later = torch.stack([torch.round(counts * f).long() for f in fractions[1:]], 1) if len(fractions) > 1 else None
    if later is None:
        return [torch.sort(order).values]
    sizes = torch.cat([(counts - later.sum(1)).clamp(min=0)[:, None], later], 1)  # (C, K)
    ends = torch.cumsum(sizes, 1)[:, :-1]  # (C, K-1) end of each part but the last
    part = (rank[:, None] >= ends[labels]).sum(1)  # (N,)
    return [torch.sort(order[part == k]).values for k in range(len(fractions))]
