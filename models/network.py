"""The incremental network: a backbone producing features and a head that grows with every task."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from models.layers.cosine_linear import IncrementalHead


class IncrementalNet(nn.Module):
    """``backbone`` (with ``out_dim``) + ``IncrementalHead`` of kind "cosine" or "linear" (0 classes at first).

    ``forward(x)`` returns ``dict(features=(B, D), scores=(B, n), logits=(B, n))``.
    """

    def __init__(self, backbone: nn.Module, head_kind: str = "cosine"):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalHead(int(backbone.out_dim), head_kind)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def features(self, x: Tensor) -> Tensor:
        """Backbone features (B, D) of images (B, C, H, W)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)  # (B, D)
        return {"features": features, **self.head(features)}

    # ----- head growth ---------------------------------------------------------------
    def expand_head(self, n_new: int) -> None:
        """Add ``n_new`` classes to the head (old rows kept exactly)."""
        self.head.expand(n_new)

    def head_layout(self) -> list[int]:
        return self.head.layout()

    def set_head_layout(self, layout: list[int]) -> None:
        """Rebuild the head with these block sizes, so that a checkpoint's state_dict loads."""
        self.head.set_layout(layout)

    def imprint(self, features: Tensor, labels: Tensor) -> None:
        """Imprint the new-class rows from features (N, D) and their labels (N,), see IncrementalHead.imprint."""
        self.head.imprint(features, labels)

    def freeze_old_classes(self, frozen: bool = True) -> None:
        self.head.freeze_old(frozen)

    def copy_frozen(self) -> IncrementalNet:
        """A deep copy in eval mode with requires_grad False everywhere: a teacher."""
        teacher = copy.deepcopy(self)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher
