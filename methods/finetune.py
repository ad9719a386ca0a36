"""Fine-tuning: cross-entropy on the current task's data only (the lower bound: it forgets)."""

from __future__ import annotations

from methods.base import Method
from methods.registry import register_method


@register_method("finetune")
class Finetune(Method):
    """Plain cross-entropy over all seen classes on the new task's data; no protection of old classes."""

    masks_padded_rows = True  # the base step's CE leaves Batch.valid's padding out
