"""Rehearsal memory: a bounded buffer of real exemplars (uint8 images + labels) and the base of the methods using it.

Budget: a fixed total ``memory_size`` shared by the seen classes (``memory_size // n_seen`` per class, iCaRL/PyCIL),
or ``memory_per_class`` exemplars per class when set (the memory then grows with the classes, LUCIR's 20).
Selection: ``herding`` (iCaRL, Rebuffi et al. 2017, Alg. 4: greedy, the running mean of the chosen L2-normalised
features tracks the class mean), ``random`` (seeded by the task's generator) or ``reservoir`` (Vitter's Algorithm R
over the stream of training images, class-agnostic, total budget only). With herding or random, each class's
exemplars are stored in selection order, so shrinking the memory when classes arrive keeps the first m of each.
A method that rehearses holds a ``RehearsalMemory`` as a part (``Method.add_part``) and calls ``loader`` for its
epochs and ``add_task`` after each task (iCaRL, rehearsal+KD, LUCIR, WA, DER, GDumb).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import BatchLoader
from dataloaders.image_set import ImageSet
from experiment.config import Config, ConfigError, Option, register_options
from methods.base import extract_features

log = logging.getLogger(__name__)

SELECTIONS = ("herding", "random", "reservoir")

register_options(
    "memory",
    [
        Option(
            "memory_size", "int", 2000, "total exemplars kept, shared by the seen classes (iCaRL/PyCIL: 2000)", min=0
        ),
        Option(
            "memory_per_class",
            "int",
            None,
            "exemplars per class instead of a fixed total (LUCIR: 20); null = memory_size // n_seen",
            min=0,
            nullable=True,
        ),
        Option(
            "memory_selection",
            "str",
            "herding",
            "how exemplars are chosen: herding (iCaRL), random (seeded), reservoir (over the stream)",
            choices=SELECTIONS,
        ),
        Option(
            "balanced_replay",
            "bool",
            False,
            "batches half new data, half memory (drawn with replacement); false: memory joined to the new data",
            scope="task",
        ),
    ],
)


@torch.no_grad()
def herding_order(features: Tensor, m: int) -> Tensor:
    """iCaRL herding (Rebuffi et al. 2017, Alg. 4): indices (min(m, N),) of features (N, D) in selection order.

    Step k picks, among the unchosen samples, argmin_j || mu - (S + f_j) / k || with f L2-normalised, mu their mean
    and S the sum of the k - 1 chosen ones; every candidate is scored at once, ties go to the lowest index.
    """
    if features.dim() != 2:
        raise ValueError(f"herding_order: features must be (N, D), got shape {tuple(features.shape)}")
    f = F.normalize(features.float(), dim=1)  # (N, D)
    n = f.shape[0]
    m = min(int(m), n)
    mu = f.mean(dim=0)  # (D,)
    running = torch.zeros_like(mu)  # sum of the chosen features
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    order = torch.empty(m, dtype=torch.long, device=f.device)
    for k in range(m):
        dist = (mu - (running + f) / (k + 1)).norm(dim=1)  # (N,)
        j = dist.masked_fill(taken, float("inf")).argmin()
        order[k] = j
        taken[j] = True
        running += f[j]
    return order


def _rank_within_class(y: Tensor) -> tuple[Tensor, Tensor]:
    """Rows grouped by class (stable: keeps the stored order) and each row's position inside its class."""
    index = torch.sort(y, stable=True).indices  # (N,)
    y_sorted = y[index]
    counts = torch.bincount(y_sorted)
    starts = torch.cumsum(counts, 0) - counts  # first position of each class
    rank = torch.arange(len(y), device=y.device) - starts[y_sorted]
    return index, rank


class RehearsalMemory:
    """Exemplars kept on ``device``: ``x`` (N, C, H, W) uint8 and ``y`` (N,) int64, never over the budget."""

    def __init__(self, memory_size: int, per_class: int | None, selection: str, device: torch.device | str):
        if selection not in SELECTIONS:
            raise ValueError(f"memory selection must be one of {SELECTIONS}, got {selection!r}")
        if memory_size < 0 or (per_class is not None and per_class < 0):
            raise ValueError(f"memory sizes must be >= 0, got memory_size={memory_size}, per_class={per_class}")
        if selection == "reservoir" and per_class is not None:
            raise ConfigError(
                "key 'memory_per_class': reservoir sampling is class-agnostic and needs a total budget; "
                f"set memory_per_class: null (got {per_class}) and use memory_size"
            )
        self.memory_size = memory_size
        self.per_class = per_class
        self.selection = selection
        self.device = torch.device(device)
        self.x: Tensor | None = None  # (N, C, H, W) uint8; None until the first update
        self.y = torch.empty(0, dtype=torch.long, device=self.device)  # (N,)
        self.n_stream = 0  # images offered to the reservoir so far

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str) -> RehearsalMemory:
        return cls(cfg.memory_size, cfg.memory_per_class, cfg.memory_selection, device)

    def __len__(self) -> int:
        return len(self.y)

    def quota(self, n_classes: int) -> int:
        """Exemplars per class once ``n_classes`` classes are seen."""
        if n_classes < 1:
            raise ValueError(f"quota needs n_classes >= 1, got {n_classes}")
        return self.per_class if self.per_class is not None else self.memory_size // n_classes

    def budget(self, n_classes: int) -> int:
        """Most exemplars the memory may hold with ``n_classes`` seen classes."""
        if self.selection == "reservoir":
            return self.memory_size
        return self.quota(n_classes) * n_classes if self.per_class is not None else self.memory_size

    def data(self) -> ImageSet | None:
        """The exemplars as an ImageSet, or None while empty."""
        return None if self.x is None or len(self) == 0 else ImageSet(self.x, self.y)

    def real_labels(self) -> Tensor:
        """Labels (N,) of the stored exemplars, real images all (counted by the data-access audit)."""
        return self.y

    def class_counts(self, n_classes: int) -> Tensor:
        """Number of exemplars of each class (n_classes,)."""
        return torch.bincount(self.y, minlength=n_classes)

    # ----- updates ----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, data: ImageSet, n_seen: int, generator: torch.Generator, features: Tensor | None = None) -> None:
        """Add exemplars of the classes in ``data`` (uint8) and shrink the others to the budget of ``n_seen`` classes.

        ``features`` (N, D) of ``data`` are required for herding (computed by the caller with the trained net).
        """
        if data.x.dtype != torch.uint8:
            raise ValueError(f"the memory stores real uint8 images, got dtype {data.x.dtype}")
        if self.selection == "reservoir":
            self._reservoir(data, generator)
            return
        if self.selection == "herding" and (features is None or len(features) != len(data)):
            raise ValueError(
                f"herding needs features (N, D) for the {len(data)} images, got "
                f"{None if features is None else tuple(features.shape)}"
            )
        classes = torch.unique(data.y)
        if bool(torch.isin(classes.to(self.device), self.y).any()):
            raise ValueError(f"classes {classes.tolist()} already have exemplars; each class may arrive only once")
        m = self.quota(n_seen)
        self.shrink(m)
        picked = []
        for c in classes.tolist():  # one vectorised selection per class
            idx = torch.nonzero(data.y == c).flatten()  # (n_c,)
            if self.selection == "herding":
                assert features is not None
                order = herding_order(features[idx], m).to(idx.device)
            else:
                order = torch.randperm(len(idx), generator=generator)[:m].to(idx.device)
            picked.append(idx[order])
        if picked:
            index = torch.cat(picked)
            self._append(data.x[index], data.y[index])

    def shrink(self, m: int) -> None:
        """Keep the first ``m`` stored exemplars of each class (their herding/random order)."""
        if len(self) == 0:
            return
        assert self.x is not None
        index, rank = _rank_within_class(self.y)
        keep = index[rank < m]
        self.x, self.y = self.x[keep], self.y[keep]

    def _append(self, x: Tensor, y: Tensor) -> None:
        x, y = x.to(self.device), y.to(self.device)
        self.x = x if self.x is None else torch.cat([self.x, x])
        self.y = torch.cat([self.y, y])

    def _reservoir(self, data: ImageSet, generator: torch.Generator) -> None:
        """Algorithm R over ``data`` in a random order, all stream positions at once; a later write to a slot wins."""
        n, cap = len(data), self.memory_size
        if n == 0 or cap == 0:
            self.n_stream += n
            return
        stream = torch.randperm(n, generator=generator)  # arrival order within the task
        pos = self.n_stream + torch.arange(1, n + 1)  # 1-based position in the whole stream
        draw = (torch.rand(n, generator=generator, dtype=torch.float64) * pos).long()  # uniform in [0, pos - 1]
        slot = torch.where(pos <= cap, pos - 1, draw)  # fill the free slots first, then replace with prob cap / pos
        accept = slot < cap
        size = min(cap, self.n_stream + n)
        winner = torch.full((size,), -1, dtype=torch.long)
        winner.scatter_reduce_(0, slot[accept], torch.arange(n)[accept], reduce="amax")
        written = winner >= 0
        source = stream[winner[written]].to(data.x.device)
        new_x = torch.empty((size, *data.x.shape[1:]), dtype=torch.uint8, device=self.device)
        new_y = torch.empty(size, dtype=torch.long, device=self.device)
        if self.x is not None and len(self):
            new_x[: len(self)], new_y[: len(self)] = self.x, self.y
        slots = written.nonzero().flatten().to(self.device)
        new_x[slots] = data.x[source].to(self.device)
        new_y[slots] = data.y[source].to(self.device)
        self.x, self.y = new_x, new_y
        self.n_stream += n

    # ----- use by a method -------------------------------------------------------------
    def loader(
        self, train: ImageSet, cfg: Config, generator: torch.Generator, device: torch.device | str
    ) -> BatchLoader:
        """One epoch over the task's data plus the memory: joined and shuffled, or 50/50 batches (memory rows
        flagged in ``Batch.synthetic``) with ``balanced_replay``."""
        common = {"batch_size": cfg.batch_size, "augment": cfg.augment, "generator": generator, "device": device}
        memory = self.data()
        if memory is None:
            return BatchLoader(train, shuffle=True, **common)
        if cfg.balanced_replay:
            return BatchLoader(train, shuffle=True, synthetic=memory, synthetic_ratio=0.5, **common)
        return BatchLoader(ImageSet.concat([train, memory.to(train.x.device)]), shuffle=True, **common)

    def add_task(
        self, net: nn.Module, train: ImageSet, n_seen: int, generator: torch.Generator, batch_size: int
    ) -> None:
        """Select the new classes' exemplars with the trained ``net`` (herding) and shrink the old classes' share."""
        features = extract_features(net, train, batch_size) if self.selection == "herding" else None
        self.update(train, n_seen, generator, features)
        log.info("memory holds %d exemplars (budget %d)", len(self), self.budget(n_seen))

    # ----- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "n_stream": self.n_stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x = None if state["x"] is None else state["x"].to(self.device)
        self.y = state["y"].to(self.device)
        self.n_stream = int(state["n_stream"])
