"""Joint training: every task trains on the real data of all classes seen so far (the upper bound)."""

from __future__ import annotations

from methods.finetune import Finetune
from methods.registry import register_method


@register_method("joint")
class Joint(Finetune):
    """Cross-entropy on all seen classes' real training data; not a continual method, a reference."""

    uses_old_data = True  # the engine hands it the training images of every seen class
