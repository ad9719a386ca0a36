"""Cosine classifiers (Hou et al., LUCIR, CVPR 2019) and the growing head of an incremental network.

``CosineLinear``: logits = sigma * cos(f, w_c) with a learnable scalar sigma (init 1).
``SplitCosineLinear``: an old-class block and a new-class block of weights, one shared sigma.
``IncrementalHead``: grows per task (old block = every earlier class, new block = this task's classes),
freezes the old block, imprints new rows from features; kind "cosine" or "linear".
Every forward returns ``dict(scores=(B, n) pre-sigma cosines, logits=(B, n))``; for "linear", scores = logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_KINDS = ("cosine", "linear")


def cosine_scores(x: Tensor, weight: Tensor) -> Tensor:
    """cos(x_i, w_c) for features (B, D) and weights (C, D) -> (B, C)."""
    return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))


def _uniform_init(weight: Tensor) -> None:
    bound = 1.0 / math.sqrt(weight.shape[1])
    nn.init.uniform_(weight, -bound, bound)


class CosineLinear(nn.Module):
    """logits = sigma * cos(f, w); sigma is a learnable scalar (init 1), or absent when ``sigma=False``."""

    def __init__(self, in_features: int, out_features: int, sigma: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        _uniform_init(self.weight)
        self.sigma = nn.Parameter(torch.tensor(1.0)) if sigma else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        scores = cosine_scores(x, self.weight)  # (B, out_features)
        return {"scores": scores, "logits": scores if self.sigma is None else self.sigma * scores}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sigma={self.sigma is not None}"


class SplitCosineLinear(nn.Module):
    """Old-class block ``fc1`` and new-class block ``fc2`` (no sigma of their own), one shared ``sigma``."""

    def __init__(self, in_features: int, out_features1: int, out_features2: int, sigma: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features1 + out_features2
        self.fc1 = CosineLinear(in_features, out_features1, sigma=False)
        self.fc2 = CosineLinear(in_features, out_features2, sigma=False)
        self.sigma = nn.Parameter(torch.tensor(1.0)) if sigma else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        scores = cosine_scores(x, torch.cat([self.fc1.weight, self.fc2.weight]))  # (B, n1 + n2), old first
        return {"scores": scores, "logits": scores if self.sigma is None else self.sigma * scores}


class SplitLinear(nn.Module):
    """Plain linear classifier made of an old-class block ``fc1`` and a new-class block ``fc2``."""

    def __init__(self, in_features: int, out_features1: int, out_features2: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features1)
        self.fc2 = nn.Linear(in_features, out_features2)

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.cat([self.fc1.weight, self.fc2.weight])
        return F.linear(x, weight, torch.cat([self.fc1.bias, self.fc2.bias]))  # (B, n1 + n2)


class IncrementalHead(nn.Module):
    """Classifier that grows task by task: at most two blocks, old classes first, then the newest task's.

    ``expand`` merges every existing row into the old block (values and sigma kept exactly) and adds a
    freshly initialised new block. ``freeze_old(True)`` stops gradients to the old block; the setting
    persists across later ``expand``/``set_layout`` calls until changed.
    """

    def __init__(self, in_features: int, kind: str = "cosine"):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(HEAD_KINDS)}")
        self.in_features = in_features
        self.kind = kind
        self.old_frozen = False
        self.register_module("fc", None)
        # Empty tensor that follows .to()/.cuda(), so new blocks are created on the head's device and dtype.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    # ----- structure -------------------------------------------------------------------
    def _make(self, layout: list[int]) -> nn.Module | None:
        d = self.in_features
        if not layout:
            return None
        if len(layout) == 1:
            fc = CosineLinear(d, layout[0]) if self.kind == "cosine" else nn.Linear(d, layout[0])
        elif self.kind == "cosine":
            fc = SplitCosineLinear(d, layout[0], layout[1])
        else:
            fc = SplitLinear(d, layout[0], layout[1])
        return fc.to(device=self._anchor.device, dtype=self._anchor.dtype)

    def _blocks(self) -> list[nn.Module]:
        """Leaf blocks, old first; each has ``weight`` (and ``bias`` for "linear")."""
        if self.fc is None:
            return []
        if isinstance(self.fc, SplitCosineLinear | SplitLinear):
            return [self.fc.fc1, self.fc.fc2]
        return [self.fc]

    def layout(self) -> list[int]:
        """Block sizes, old first: [] before the first expand, [n] after it, [n_old, n_new] later."""
        return [b.weight.shape[0] for b in self._blocks()]

    def set_layout(self, layout: list[int]) -> None:
        """Rebuild (freshly initialised) blocks of these sizes, e.g. before ``load_state_dict`` of a checkpoint."""
        layout = [int(n) for n in layout]
        if len(layout) > 2 or any(n < 1 for n in layout):
            raise ValueError(f"head layout must be [], [n] or [n_old, n_new] with sizes >= 1, got {layout}")
        self.fc = self._make(layout)
        self._apply_freeze()

    @property
    def num_classes(self) -> int:
        return sum(self.layout())

    @property
    def sigma(self) -> nn.Parameter | None:
        """The shared scale of a cosine head (None for "linear" or before the first expand)."""
        return None if self.fc is None or self.kind != "cosine" else self.fc.sigma

    def all_weights(self) -> Tensor:
        """All class weight rows (num_classes, D), old first."""
        blocks = self._blocks()
        if not blocks:
            return self._anchor.new_zeros(0, self.in_features)
        return torch.cat([b.weight for b in blocks])

    # ----- growth ----------------------------------------------------------------------
    @torch.no_grad()
    def expand(self, n_new: int) -> None:
        """Add ``n_new`` classes; existing rows (and bias, sigma) become the old block unchanged."""
        if n_new < 1:
            raise ValueError(f"expand needs n_new >= 1, got {n_new}")
        if self.fc is None:
            self.fc = self._make([n_new])
        else:
            blocks = self._blocks()
            old_weight = torch.cat([b.weight for b in blocks])  # (n_old, D)
            old_bias = torch.cat([b.bias for b in blocks]) if self.kind == "linear" else None
            old_sigma = self.sigma
            fc = self._make([old_weight.shape[0], n_new])
            fc.fc1.weight.copy_(old_weight)
            if old_bias is not None:
                fc.fc1.bias.copy_(old_bias)
            if old_sigma is not None:
                fc.sigma.copy_(old_sigma)
            self.fc = fc
        self._apply_freeze()

    def freeze_old(self, frozen: bool = True) -> None:
        """Set requires_grad of the old-class block to ``not frozen`` (the lr-0 old block of LUCIR/CCSI)."""
        self.old_frozen = frozen
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        blocks = self._blocks()
        if len(blocks) == 2:
            blocks[0].requires_grad_(not self.old_frozen)

    @torch.no_grad()
    def imprint(self, features: Tensor, labels: Tensor) -> None:
        """Set each new-class row to normalise(mean_i normalise(f_i)) * mean norm of the old rows (1 if none).

        ``labels`` are class indices over the whole head; samples of other classes are ignored, and every
        new class needs at least one sample. For "linear" the new biases are set to 0.
        """
        layout = self.layout()
        if not layout:
            raise ValueError("imprint: the head has no classes yet; call expand first")
        if features.ndim != 2 or features.shape[1] != self.in_features or labels.shape != features.shape[:1]:
            raise ValueError(
                f"imprint: expected features (N, {self.in_features}) and labels (N,), "
                f"got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        new_block = self._blocks()[-1]
        n_new = layout[-1]
        n_old = self.num_classes - n_new
        weight = new_block.weight
        feats = F.normalize(features.to(device=weight.device, dtype=weight.dtype), dim=1)  # (N, D)
        rel = labels.to(weight.device).long() - n_old  # position within the new block
        keep = (rel >= 0) & (rel < n_new)
        rel, feats = rel[keep], feats[keep]
        counts = torch.bincount(rel, minlength=n_new)  # (n_new,)
        if (counts == 0).any():
            missing = (torch.nonzero(counts == 0).flatten() + n_old).tolist()
            raise ValueError(f"imprint: no features for new classes {missing}")
        sums = torch.zeros(n_new, self.in_features, device=weight.device, dtype=weight.dtype)
        sums.index_add_(0, rel, feats)
        means = sums / counts.unsqueeze(1).to(weight.dtype)  # (n_new, D)
        old_weight = self.all_weights()[:n_old]
        scale = old_weight.norm(dim=1).mean() if n_old > 0 else 1.0
        weight.copy_(F.normalize(means, dim=1) * scale)
        if self.kind == "linear":
            new_block.bias.zero_()

    # ----- forward ---------------------------------------------------------------------
    def forward(self, features: Tensor) -> dict[str, Tensor]:
        if self.fc is None:
            empty = features.new_zeros(features.shape[0], 0)
            return {"scores": empty, "logits": empty}
        if self.kind == "cosine":
            return self.fc(features)
        logits = self.fc(features)  # (B, num_classes)
        return {"scores": logits, "logits": logits}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, layout={self.layout()}"
