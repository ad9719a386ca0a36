"""The data-access audit: how many real images of old classes reached the method during a task, and by which path.

A data-free class-incremental learner may not see a real image of a class after that class's task, for any
purpose. Each task the engine gives the method a ``DataAccess`` (``TaskContext.access``) and counts the real images
of old classes (labels < n_old) on every path it controls; a method counts the paths only it knows (IdC, class
statistics). The counts go into ``metrics.json`` as ``tasks[i].data_access``. Paths:

- ``context``: images of old classes in the splits handed to the method (``ctx.train``, ``ctx.val``, ``ctx.test``);
- ``train_batches``: real (not synthetic) rows of old classes in the training batches, with repeats;
- ``idc``: rows of the unlabelled IdC batches (CCSI), with repeats;
- ``selection``: images evaluated for model selection and the lr monitor, once per evaluation;
- ``statistics``: images the method computes per-class statistics on (CCSI's mean images and CN moments);
- ``memory``: real images of old classes held in the method's state after the task (rehearsal memories).

Rows drawn with replacement count once per draw. A replay memory whose rows are flagged synthetic
(``balanced_replay``) shows under ``memory`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

PATHS = ("context", "train_batches", "idc", "selection", "statistics", "memory")


class DataAccess:
    """Per path, the number of real images of classes below ``n_old`` that reached the method in one task."""

    def __init__(self, n_old: int):
        self.n_old = n_old
        self._counts: dict[str, Tensor | int] = dict.fromkeys(PATHS, 0)

    def record(self, path: str, labels: Tensor, real: Tensor | None = None) -> None:
        """Count the ``labels`` (N,) of old classes (only the rows where ``real`` (N,) bool, when given).

        Sums stay tensors on the labels' device, so recording inside a training step does not synchronise."""
        if path not in self._counts:
            raise ValueError(f"unknown data-access path {path!r}; one of {', '.join(PATHS)}")
        old = labels < self.n_old
        if real is not None:
            old = old & real.to(old.device)
        self._counts[path] = self._counts[path] + old.sum()

    def counts(self) -> dict[str, int]:
        """Every path's count (0 where nothing was recorded) and their ``total``."""
        out = {
            path: int(count.item()) if isinstance(count, torch.Tensor) else count
            for path, count in self._counts.items()
        }
        return {**out, "total": sum(out.values())}
