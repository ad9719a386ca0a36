"""DER: Dynamically Expandable Representation (Yan, Xie, He, CVPR 2021), without the pruning stage.

Each task adds a feature extractor (the configured backbone, initialised from the previous one as in
PyCIL's ``DERNet.update_fc`` when ``der_init_from_previous``); the earlier extractors are frozen and kept
in eval mode. A linear classifier reads the concatenated features of all extractors and grows with the
classes: old rows are copied onto the old features' columns, their new-feature columns start at zero (the
expanded net first scores the old classes as the previous one did). An auxiliary linear classifier on the
newest extractor's features has n_new + 1 outputs, the old classes merged into one:
``loss = CE(logits, y) + der_aux_weight * CE(aux_logits, aux_y)`` (paper Eq. 5 without the sparsity term).
Not implemented: the channel masks and pruning (as in PyCIL) and the class-balanced classifier re-training.
Memory: the rehearsal buffer of ``methods.memory`` (paper: 2000 exemplars, herding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models
from dataloaders.batches import Batch
from experiment.config import Config, Option, register_options
from methods.base import Method, TaskContext
from methods.memory import RehearsalMemory
from methods.registry import register_method

register_options(
    "der",
    [
        Option("der_aux_weight", "float", 1.0, "weight of the auxiliary (n_new + 1)-way loss (paper: 1)", min=0.0),
        Option(
            "der_init_from_previous",
            "bool",
            True,
            "start each new extractor from the previous one's weights (PyCIL DERNet) instead of a fresh init",
            scope="experiment",
        ),
    ],
    scope="task",
)


class DERNet(nn.Module):
    """Extractors (one per task) -> concatenated features -> growing linear classifier, plus an auxiliary head.

    ``forward(x)`` returns dict(features=(B, k*D), scores=logits, logits=(B, n_seen)) and, from the second task
    on, aux_logits=(B, n_new + 1). ``head_layout()`` is the list of task sizes, from which
    ``set_head_layout`` rebuilds the extractors and classifiers before a checkpoint's state_dict is loaded.
    """

    def __init__(self, first: nn.Module, make_extractor: Callable[[], nn.Module], init_from_previous: bool = True):
        super().__init__()
        self.make_extractor = make_extractor
        self.init_from_previous = init_from_previous
        self.extractors = nn.ModuleList([first])
        self.out_dim = int(first.out_dim)
        self.fc: nn.Linear | None = None
        self.aux_fc: nn.Linear | None = None
        self.task_sizes: list[int] = []

    @property
    def feature_dim(self) -> int:
        return self.out_dim * len(self.extractors)

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    def features(self, x: Tensor) -> Tensor:
        """Concatenated features (B, k*D) of every extractor, oldest first."""
        return torch.cat([extractor(x) for extractor in self.extractors], dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.features(x)  # (B, k*D)
        if self.fc is None:
            logits = features.new_zeros(features.shape[0], 0)
        else:
            logits = self.fc(features)  # (B, n_seen)
        out = {"features": features, "scores": logits, "logits": logits}
        if self.aux_fc is not None:
            out["aux_logits"] = self.aux_fc(features[:, -self.out_dim :])  # (B, n_new + 1)
        return out

    def train(self, mode: bool = True) -> DERNet:
        """Train mode for the newest extractor and the classifiers only: frozen extractors stay in eval mode."""
        super().train(mode)
        for extractor in self.extractors[:-1]:
            extractor.eval()
        return self

    # ----- growth ----------------------------------------------------------------------
    @torch.no_grad()
    def expand_head(self, n_new: int) -> None:
        """Start a task of ``n_new`` classes: freeze the extractors, add one (not for the first task), grow fc."""
        if n_new < 1:
            raise ValueError(f"expand_head needs n_new >= 1, got {n_new}")
        ref = next(self.extractors[-1].parameters())  # device and dtype of new layers
        if self.task_sizes:
            self.extractors.requires_grad_(False)
            new = self.make_extractor().to(device=ref.device, dtype=ref.dtype)
            if self.init_from_previous:
                new.load_state_dict(self.extractors[-1].state_dict())
            new.requires_grad_(True)
            self.extractors.append(new)
            self.extractors[:-1].eval()
        n_old = self.num_classes
        fc = nn.Linear(self.feature_dim, n_old + n_new).to(device=ref.device, dtype=ref.dtype)
        if self.fc is not None:
            old_in = self.fc.in_features
            fc.weight[:n_old].zero_()
            fc.weight[:n_old, :old_in] = self.fc.weight
            fc.bias[:n_old] = self.fc.bias
        self.fc = fc
        self.aux_fc = None
        if self.task_sizes:
            self.aux_fc = nn.Linear(self.out_dim, n_new + 1).to(device=ref.device, dtype=ref.dtype)
        self.task_sizes.append(n_new)

    def head_layout(self) -> list[int]:
        return list(self.task_sizes)

    def set_head_layout(self, layout: list[int]) -> None:
        """Rebuild one extractor per task and classifiers of these task sizes (weights are then loaded)."""
        if any(int(n) < 1 for n in layout):
            raise ValueError(f"DER layout must be task sizes >= 1, got {layout}")
        del self.extractors[1:]
        self.extractors.requires_grad_(True)
        self.fc, self.aux_fc, self.task_sizes = None, None, []
        for n in layout:
            self.expand_head(int(n))


@register_method("der")
class DER(Method):
    """One new extractor per task on top of the frozen old ones, trained with rehearsal and an auxiliary loss."""

    requires: ClassVar[dict[str, Any]] = {"head": "linear"}  # a linear classifier over concatenated features

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        backbone = net.backbone

        def make_extractor() -> nn.Module:
            return models.build_net(cfg, backbone.in_channels, backbone.image_size).backbone

        super().__init__(cfg, DERNet(backbone, make_extractor, cfg.der_init_from_previous).to(device), device)
        self.memory = self.add_part("memory", RehearsalMemory.from_config(cfg, device))

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        return self.memory.loader(ctx.train, self.cfg, ctx.generator, self.device)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        out = self.net(batch.x)
        ce = F.cross_entropy(out["logits"], batch.y)
        if "aux_logits" not in out:
            return {"loss": ce, "ce": ce}
        aux_y = torch.where(batch.y >= self.n_old, batch.y - self.n_old + 1, torch.zeros_like(batch.y))  # (B,)
        aux = F.cross_entropy(out["aux_logits"], aux_y)
        return {"loss": ce + self.cfg.der_aux_weight * aux, "ce": ce, "aux": aux}

    def after_task(self, ctx: TaskContext) -> None:
        self.memory.add_task(self.net, ctx.train, ctx.n_seen, ctx.generator, self.cfg.eval_batch_size)
