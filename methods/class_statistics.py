"""What CCSI keeps about each learned class instead of real images: its mean image and layer moments (and, with
``ccsi_prototypes``, its feature prototype).

After a class's task, ``ClassMemory.add_task`` stores, per class, the pixel-wise mean of its training images and
the channel moments (mean, population variance) of the input of every ``nn.BatchNorm2d`` of the trained model
(for Continual Normalization: the GroupNorm output). Synthesis starts impressions from the mean images and
matches the moments (``continual_class_specific_impression``). No real image is ever stored. ``refresh``
re-estimates the stored moments of old classes from impressions passed through a newer model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dataloaders.image_set import ImageSet, as_float
from methods.base import extract_features
from synthesis_losses import bn_layers, capture_bn_inputs, eval_mode


def class_mean_images(images: ImageSet, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(labels (K,) sorted, mean images (K, C, H, W) float in [0, 1]) of the classes present in ``images``."""
    labels, inverse = torch.unique(images.y, sorted=True, return_inverse=True)
    sums = torch.zeros((len(labels), *images.x.shape[1:]), dtype=torch.float64, device=images.x.device)
    for start in range(0, len(images), chunk):
        x = as_float(images.x[start : start + chunk]).double()  # (n, C, H, W)
        sums.index_add_(0, inverse[start : start + chunk].to(x.device), x)
    counts = torch.bincount(inverse, minlength=len(labels)).to(sums)
    return labels.cpu(), (sums / counts[:, None, None, None]).float().cpu()


@torch.no_grad()
def class_statistics(
    net: nn.Module, images: ImageSet, batch_size: int, device: torch.device | str
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per hooked layer: (labels (K,), mean (K, ch), population variance (K, ch)) of the layer's input per class.

    Accumulated over samples x pixels with ``net`` in eval mode (sums and sums of squares by label, float64).
    """
    layers = bn_layers(net)
    labels, inverse = torch.unique(images.y, sorted=True, return_inverse=True)
    k = len(labels)
    sums = [torch.zeros(k, layer.num_features, dtype=torch.float64, device=device) for layer in layers]
    squares = [torch.zeros_like(s) for s in sums]
    pixels = [torch.zeros(k, dtype=torch.float64, device=device) for _ in layers]  # samples x pixels per class
    with eval_mode(net), capture_bn_inputs(layers) as store:
        for start in range(0, len(images), batch_size):
            x = as_float(images.x[start : start + batch_size]).to(device)  # (b, C, H, W)
            idx = inverse[start : start + batch_size].to(device)
            store.clear()
            net(x)
            for i in range(len(layers)):
                if i not in store:
                    raise ValueError(f"normalisation layer {i} ({layers[i]}) was not used in the forward pass")
                a = store[i].double()  # (b, ch, h, w)
                sums[i].index_add_(0, idx, a.sum(dim=(2, 3)))
                squares[i].index_add_(0, idx, a.square().sum(dim=(2, 3)))
                pixels[i].index_add_(0, idx, torch.full_like(idx, a[0, 0].numel(), dtype=torch.float64))
    out = []
    for s, q, n in zip(sums, squares, pixels):
        mean = s / n[:, None]
        var = (q / n[:, None] - mean.square()).clamp_min(0.0)
        out.append((labels.cpu(), mean.cpu(), var.cpu()))
    return out


class ClassMemory:
    """Per class: the mean image and the moments of every hooked layer's input; merged across tasks."""

    def __init__(self) -> None:
        self.labels = torch.zeros(0, dtype=torch.long)  # (K,) sorted
        self.mean_images: Tensor | None = None  # (K, C, H, W) float in [0, 1]
        self.layer_means: list[Tensor] = []  # per layer (K, ch) float64
        self.layer_vars: list[Tensor] = []  # per layer (K, ch) float64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_layers(self) -> int:
        return len(self.layer_means)

    def add(self, labels: Tensor, mean_images: Tensor, stats: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """Merge classes in; a class already present is replaced."""
        labels = labels.long().cpu()
        if self.mean_images is not None and mean_images.shape[1:] != self.mean_images.shape[1:]:
            raise ValueError(
                f"mean images {tuple(mean_images.shape[1:])} differ from {tuple(self.mean_images.shape[1:])}"
            )
        if len(self) and len(stats) != self.num_layers:
            raise ValueError(f"got statistics of {len(stats)} layers, the memory holds {self.num_layers}")
        for layer_labels, _, _ in stats:
            if not torch.equal(layer_labels.cpu(), labels):
                raise ValueError("class statistics and mean images are for different labels")
        keep = ~torch.isin(self.labels, labels)
        order = torch.argsort(torch.cat([self.labels[keep], labels]))

        def merge(old: Tensor | None, new: Tensor) -> Tensor:
            new = new.detach().cpu()
            if old is None:
                return new[order]
            return torch.cat([old[keep.to(old.device)], new.to(old)])[order.to(old.device)]

        self.mean_images = merge(self.mean_images, mean_images.float())
        old_means = self.layer_means or [None] * len(stats)
        old_vars = self.layer_vars or [None] * len(stats)
        self.layer_means = [merge(o, m.double()) for o, (_, m, _) in zip(old_means, stats)]
        self.layer_vars = [merge(o, v.double()) for o, (_, _, v) in zip(old_vars, stats)]
        self.labels = torch.cat([self.labels[keep], labels])[order]

    def add_task(self, net: nn.Module, images: ImageSet, batch_size: int, device: torch.device | str) -> None:
        """Compute and merge the mean images and class statistics of the classes in ``images``."""
        labels, means = class_mean_images(images)
        self.add(labels, means, class_statistics(net, images, batch_size, device))

    def refresh(self, net: nn.Module, impressions: ImageSet, batch_size: int, device: torch.device | str) -> None:
        """Replace the stored moments of the impressions' classes by their moments under ``net`` (data-free: the
        impressions stand in for the class's real images); mean images and other classes are unchanged."""
        if len(impressions) == 0:
            return
        stats = class_statistics(net, impressions, batch_size, device)
        if len(stats) != self.num_layers:
            raise ValueError(f"got statistics of {len(stats)} layers, the memory holds {self.num_layers}")
        for i, (labels, mean, var) in enumerate(stats):
            rows = self.rows(labels).to(self.layer_means[i].device)
            self.layer_means[i][rows] = mean.to(self.layer_means[i])
            self.layer_vars[i][rows] = var.to(self.layer_vars[i])

    def rows(self, labels: Tensor) -> Tensor:
        """Row index of each label; raises if a label is not stored."""
        labels = labels.cpu()
        missing = sorted(set(labels.tolist()) - set(self.labels.tolist()))
        if missing:
            raise ValueError(f"class memory has no entry for classes {missing} (stored: {self.labels.tolist()})")
        return torch.searchsorted(self.labels, labels)

    def state_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels.clone(),
            "mean_images": None if self.mean_images is None else self.mean_images.clone(),
            "layer_means": [m.clone() for m in self.layer_means],
            "layer_vars": [v.clone() for v in self.layer_vars],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels = state["labels"].long()
        self.mean_images = state["mean_images"]
        self.layer_means = list(state["layer_means"])
        self.layer_vars = list(state["layer_vars"])

    def to(self, device: torch.device | str) -> ClassMemory:
        """Move the tensors (labels stay on the CPU for lookups); returns self."""
        if self.mean_images is not None:
            self.mean_images = self.mean_images.to(device)
        self.layer_means = [m.to(device) for m in self.layer_means]
        self.layer_vars = [v.to(device) for v in self.layer_vars]
        return self


class FeaturePrototypes:
    """Per learned class, its feature prototype as PASS keeps it (Zhu et al., CVPR 2021): the mean (D,) of its
    training images' backbone features and their spread (the root of the mean variance over feature dimensions),
    taken with the model trained on the class's task, in eval mode. No image is stored."""

    def __init__(self) -> None:
        self.labels = torch.empty(0, dtype=torch.long)
        self.means: Tensor | None = None  # (K, D)
        self.radius: Tensor | None = None  # (K,)

    def add_task(self, net: nn.Module, images: ImageSet, batch_size: int) -> None:
        """Store the prototypes of the classes in ``images`` (classes not stored yet, in label order)."""
        features = extract_features(net, images, batch_size).double()  # (N, D)
        labels = torch.unique(images.y.cpu(), sorted=True)
        y = images.y.to(features.device)
        means = torch.stack([features[y == c].mean(dim=0) for c in labels.tolist()])  # (K, D)
        radius = torch.stack([features[y == c].var(dim=0, unbiased=False).mean().sqrt() for c in labels.tolist()])
        self.labels = torch.cat([self.labels, labels])
        self.means = means.float() if self.means is None else torch.cat([self.means, means.float().to(self.means)])
        self.radius = (
            radius.float() if self.radius is None else torch.cat([self.radius, radius.float().to(self.radius)])
        )

    def compensate_drift(self, before: Tensor, after: Tensor) -> None:
        """Move each stored mean by the drift of the features near it (SDC, Yu et al., CVPR 2020): ``before`` (N, D)
        and ``after`` (N, D) are the same images' features under the previous and the trained model (the task's own
        images: no old class); mean c moves by the average of after - before, weighted by
        exp(-|before_i - mean_c|^2 / (2 D radius_c^2)), a Gaussian as wide as the class's own spread."""
        assert self.means is not None and self.radius is not None, "no prototype stored"
        before, after = before.double().to(self.means.device), after.double().to(self.means.device)
        d = before.shape[1]
        distance = torch.cdist(self.means.double(), before).square()  # (K, N)
        width = (2 * d * self.radius.double()[:, None].square()).clamp_min(1e-12)  # a one-image class: nearest image
        weights = torch.softmax(-distance / width, dim=1)  # (K, N)
        self.means = (self.means.double() + weights @ (after - before)).float()

    def sample(self, per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``per_class`` Gaussian draws around each stored prototype, mean + radius * N(0, I):
        (features (K * per_class, D), labels (K * per_class,)) on the prototypes' device."""
        assert self.means is not None and self.radius is not None, "no prototype stored"
        k, d = self.means.shape
        noise = torch.randn(k, per_class, d, generator=generator).to(self.means)
        features = self.means[:, None, :] + self.radius[:, None, None] * noise
        return features.reshape(k * per_class, d), self.labels.to(self.means.device).repeat_interleave(per_class)

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels.clone(), "means": self.means, "radius": self.radius}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels, self.means, self.radius = state["labels"].long(), state["means"], state["radius"]
