"""PASS: Prototype Augmentation and Self-Supervision (Zhu et al., CVPR 2021), as in its public code
(Impression2805/CVPR21_PASS ``PASS.py``). Registered as ``pass`` (the module is ``pass_``: ``pass`` is a keyword).

No image of an old class is replayed or generated. Every image of a batch is rotated by 0, 90, 180 and 270 degrees
and the head has 4 outputs per class (label 4 y + k for rotation k; prediction reads the k = 0 outputs). From task
2 on the loss is ``CE(logits / T, 4 y + k)`` on the rotated real rows + ``pass_proto_weight`` * CE of the head on
augmented prototypes (one per real image: an old class drawn uniformly, its stored mean feature plus N(0, I) noise
times the radius, label 4 c, logits / T) + ``pass_kd_weight`` * ||f - f_old||_2 over the whole batch of rotated
rows (the code's ``torch.dist``, a norm, not a mean). After each task the class-mean features of the new classes
are stored (never images); the radius sqrt(mean_c tr(Cov_c) / D) is computed after the first task only, as the code.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch
from experiment.config import Config, ConfigError, Option, register_options
from methods import losses
from methods.base import Method, TaskContext, extract_features
from methods.generator_inversion import draw_normal_rows
from methods.registry import register_method

ROTATIONS = 4

register_options(
    "pass",
    [
        Option("pass_proto_weight", "float", 10.0, "weight of the prototype-augmentation CE (PASS code: 10)", min=0.0),
        Option("pass_kd_weight", "float", 10.0, "weight of the feature distillation norm (PASS code: 10)", min=0.0),
        Option(
            "pass_temperature",
            "float",
            0.1,
            "training temperature of both CE terms (PASS code: 0.1)",
            min=0.0,
            min_exclusive=True,
        ),
    ],
    scope="task",
)


def rotate_batch(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B, C, H, H) and labels (B,) -> the 4 rotations of each image (4B, C, H, H), image-major, with labels
    4 y + k (4B,) for the rotation by k * 90 degrees."""
    if x.dim() != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"rotation needs square images (B, C, H, H), got {tuple(x.shape)}")
    rotated = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(ROTATIONS)], dim=1)  # (B, 4, C, H, H)
    labels = y[:, None] * ROTATIONS + torch.arange(ROTATIONS, device=y.device)  # (B, 4)
    return rotated.flatten(0, 1), labels.flatten()


def class_prototypes(features: Tensor, labels: Tensor, classes: list[int]) -> tuple[Tensor, Tensor]:
    """Per class of ``classes``: the mean feature (n, D) and tr(Cov) / D (n,) (unbiased covariance, as np.cov)."""
    means, spreads = [], []
    for c in classes:  # a few classes per task, not per sample
        rows = features[labels == c]  # (N_c, D)
        if len(rows) < 2:
            raise ValueError(f"PASS prototypes: class {c} has {len(rows)} training images, needs at least 2")
        means.append(rows.mean(dim=0))
        spreads.append(rows.var(dim=0, unbiased=True).mean())
    return torch.stack(means), torch.stack(spreads)


class Prototypes:
    """The stored class-mean features (n_classes, D), by label, and the augmentation radius: PASS's memory."""

    def __init__(self) -> None:
        self.means: Tensor | None = None
        self.radius = 0.0

    def add(self, means: Tensor) -> None:
        self.means = means if self.means is None else torch.cat([self.means, means.to(self.means)])

    def state_dict(self) -> dict[str, Any]:
        return {"means": None if self.means is None else self.means.cpu(), "radius": self.radius}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means, self.radius = state["means"], float(state["radius"])


@register_method("pass")
class PASS(Method):
    """Prototype augmentation in feature space + rotation self-supervision, no replay (Zhu et al., CVPR 2021)."""

    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}  # the code's linear classifier

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.prototypes = self.add_part("prototypes", Prototypes())
        self.rng: torch.Generator | None = None

    @classmethod
    def check(cls, cfg: Config, task_sizes: list[int]) -> None:
        if cfg.head != "linear":
            raise ConfigError(
                f"method 'pass' rotates labels into 4 outputs per class; needs head: linear, not {cfg.head}"
            )

    def before_task(self, ctx: TaskContext) -> None:
        self.rng = ctx.generator
        self.net.expand_head(ROTATIONS * ctx.n_new)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        x, y = rotate_batch(batch.x, batch.y)  # (4B, C, H, H), (4B,)
        out = self.net(x)
        ce = F.cross_entropy(out["logits"] / cfg.pass_temperature, y)
        if self.teacher is None:
            return {"loss": ce, "ce": ce}
        assert self.rng is not None and self.prototypes.means is not None
        with torch.no_grad():
            old_features = self.teacher(x)["features"]  # (4B, D)
        kd = losses.feature_distance(out["features"], old_features, batch.shard)
        means = self.prototypes.means.to(out["features"])  # (n_old, D)
        classes = batch.draw_rows(self.n_old, self.rng)  # (B,) one old class per real image
        noise = draw_normal_rows(batch.shard, len(batch), means.shape[1], self.rng).to(means)  # (B, D)
        augmented = means[classes.to(means.device)] + noise * self.prototypes.radius  # (B, D)
        proto_logits = self.net.head(augmented)["logits"] / cfg.pass_temperature  # (B, 4 n_seen)
        proto = F.cross_entropy(proto_logits, classes.to(proto_logits.device) * ROTATIONS)
        loss = ce + cfg.pass_proto_weight * proto + cfg.pass_kd_weight * kd
        return {"loss": loss, "ce": ce, "proto": proto, "kd": kd}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, n_seen) of the unrotated outputs."""
        return self.net(x)["logits"][:, ::ROTATIONS]

    def after_task(self, ctx: TaskContext) -> None:
        """Store the new classes' mean features (the task's own images; the radius after the first task only)."""
        ctx.access.record("statistics", ctx.train.y)  # new classes only: 0 by construction, recorded for the audit
        features = extract_features(self.net, ctx.train, self.cfg.eval_batch_size)  # (N, D)
        means, spreads = class_prototypes(features, ctx.train.y.to(features.device), ctx.new_classes)
        if self.prototypes.means is None:
            self.prototypes.radius = float(spreads.mean().sqrt())
        self.prototypes.add(means)
