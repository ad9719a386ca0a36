"""A frozen teacher's outputs for the images a task trains on, computed once per task instead of every step.

The teacher (the previous task's model, in eval mode, without gradients) gives an unchanged training image
the same output in every epoch. When a batch says which image of the task's real or replay set each row is
(``Batch.index``: set by ``BatchLoader`` when no augmentation changed the images), ``TeacherCache.lookup``
gathers the outputs computed on the first lookup; otherwise it returns None and the method runs the teacher.
On the CPU the cached outputs equal per-batch forwards bit for bit: eval-mode forwards are row-independent
for two or more rows (measured; a one-row forward takes another kernel path, so neither the cache nor a
lookup ever uses one). On a GPU they agree up to float rounding (cuDNN picks kernels per batch size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet, as_float


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: ImageSet, key: str, batch_size: int) -> Tensor:
    """``teacher(x)[key]`` (N, ...) of every image, in chunks of ``batch_size`` (a one-image chunk is run twice)."""
    outs = []
    for start in range(0, len(images), batch_size):
        x = as_float(images.x[start : start + batch_size])  # (n, C, H, W)
        n = len(x)
        outs.append(teacher(x if n > 1 else x.repeat(2, 1, 1, 1))[key][:n])
    return torch.cat(outs)


class TeacherCache:
    """Outputs ``key`` of a frozen ``teacher`` for the rows of ``real`` and ``replay`` (the sources of the batches)."""

    def __init__(self, teacher: nn.Module, key: str, real: ImageSet, replay: ImageSet | None, batch_size: int):
        self.teacher, self.key, self.batch_size = teacher, key, batch_size
        self.real, self.replay = real, replay
        self.table: Tensor | None = None  # (N_real + N_replay, ...) built on the first lookup

    def lookup(self, batch: Batch) -> Tensor | None:
        """The teacher's outputs for the batch's rows, or None when the rows are not unchanged source images."""
        if batch.index is None or len(batch) < 2:
            return None
        table = self.build()
        offset = batch.synthetic.long() * len(self.real)  # replay rows follow the real ones in the table
        return table[batch.index.to(table.device) + offset.to(table.device)]

    def build(self) -> Tensor:
        """The table of outputs (N_real + N_replay, ...), computed on the first call."""
        if self.table is None:
            sources = [s for s in (self.real, self.replay) if s is not None and len(s) > 0]
            self.table = torch.cat([teacher_outputs(self.teacher, s, self.key, self.batch_size) for s in sources])
        return self.table
