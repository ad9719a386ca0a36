"""Fine-tuning: cross-entropy on the current task's data only (the lower bound: it forgets)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dataloaders.batches import Batch
from methods import register_method
from methods.base import Method


@register_method("finetune")
class Finetune(Method):
    """Plain cross-entropy over all seen classes on the new task's data; no protection of old classes."""

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        ce = F.cross_entropy(logits, batch.y)
        return {"loss": ce, "ce": ce}
