"""The objective of class-impression synthesis, computed for G independent groups of images at once.

Every loss function takes a group axis first and returns one value per group, so that G batches of
synthetic images can be optimised in one tensor while each group keeps exactly its own objective
(the sum over groups has block-diagonal gradients). The terms follow DeepInversion (Yin et al.,
CVPR 2020) as used by CCSI (Ayromlou et al., 2024); ``impression_loss`` combines them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_TERMS = ("ce", "bn", "tv", "l2", "total")


def bn_layers(net: nn.Module) -> list[nn.BatchNorm2d]:
    """Layers whose inputs are matched: every nn.BatchNorm2d in registration order (the first gets extra weight)."""
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def teacher_logits(output: Any) -> Tensor:
    """Logits from a model output: a tensor, or a dict with key "logits"."""
    return output["logits"] if isinstance(output, dict) else output


@contextmanager
def capture_bn_inputs(layers: list[nn.BatchNorm2d]) -> Iterator[dict[int, Tensor]]:
    """Forward pre-hooks that store the input of ``layers[i]`` under key i during each forward."""
    store: dict[int, Tensor] = {}

    def hook(index: int):
        def fn(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            store[index] = inputs[0]

        return fn

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Put ``net`` in eval mode and restore its previous mode afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the synthesis objective (config keys in brackets)."""

    ce: float = 1.0  # cross-entropy of the teacher's logits [main_loss_multiplier]
    bn: float = 1.0  # moment matching [r_feature]
    first_bn: float = 10.0  # extra factor of the first layer's moment term [first_bn_multiplier]
    tv: float = 0.01  # total variation [tv_l2]
    l2: float = 0.1  # mean image L2 norm [l2]


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a narrower float type (autocast's bf16/fp16), else ``t`` itself."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _FusedGroupMoments(torch.autograd.Function):
    """mean and population variance over dims (1, 3) of (G, B, ch, HW); the backward in one fused expression.

    Forward: one pass of contiguous reductions over HW (sum and squared L2 norm per image and channel), then
    var = E[a^2] - mean^2 (equal to ``group_moments``' two passes up to float rounding for activations of
    moderate mean/std ratio, as normalised ones are; clamped at 0).
    Backward: d/da = g_mean / n + 2 g_var (a - mean) / n = a * s + t with per-(G, ch) s = 2 g_var / n and
    t = g_mean / n - s * mean: one multiply-add over the activation instead of autograd's chain of elementwise
    passes (sub, square, mean and their gradients).
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor) -> tuple[Tensor, Tensor]:
        n = a.shape[1] * a.shape[3]
        mean = a.sum(dim=3).sum(dim=1) / n  # (G, ch): contiguous sums over HW first
        mean_square = torch.linalg.vector_norm(a, dim=3).square().sum(dim=1) / n  # (G, ch)
        var = (mean_square - mean.square()).clamp_min(0.0)  # (G, ch)
        ctx.save_for_backward(a, mean)
        return mean, var

    @staticmethod
    def backward(ctx: Any, g_mean: Tensor, g_var: Tensor) -> Tensor:
        a, mean = ctx.saved_tensors
        n = a.shape[1] * a.shape[3]
        scale = g_var * (2.0 / n)  # (G, ch)
        shift = g_mean / n - scale * mean  # (G, ch)
        return torch.addcmul(shift[:, None, :, None], a, scale[:, None, :, None])


def group_moments(activation: Tensor, groups: int, fused: bool = False) -> tuple[Tensor, Tensor]:
    """Per-group channel mean and population variance over (samples, H, W) of (G*B, ch, H, W), in float32 or wider.

    ``fused``: the same values up to float rounding, computed in one pass, with the gradient in one multiply-add
    (``syn_fused_moments``; faster).
    """
    a = at_least_float32(activation)
    a = a.reshape(groups, -1, a.shape[1], a[0, 0].numel())  # (G, B, ch, HW)
    if fused:
        return _FusedGroupMoments.apply(a)
    mean = a.mean(dim=(1, 3))  # (G, ch)
    var = (a - mean[:, None, :, None]).square().mean(dim=(1, 3))  # (G, ch)
    return mean, var


def moment_loss(mean: Tensor, var: Tensor, target_mean: Tensor, target_var: Tensor) -> Tensor:
    """R = ||var_t - var||_2 + ||mu_t - mu||_2 over channels: (G, ch) tensors in, (G,) out."""
    return torch.linalg.vector_norm(target_var - var, dim=-1) + torch.linalg.vector_norm(target_mean - mean, dim=-1)


def total_variation(x: Tensor) -> Tensor:
    """Sum over 4 directions (horizontal, vertical, two diagonals) of the L2 norm of the difference tensor.

    ``x`` is (G, B, C, H, W); each norm is taken over the whole group (not per image, not squared),
    as in DeepInversion's ``get_image_prior_losses``. Returns (G,).
    """
    dims = (1, 2, 3, 4)
    horizontal = x[..., :, :-1] - x[..., :, 1:]
    vertical = x[..., :-1, :] - x[..., 1:, :]
    anti_diagonal = x[..., 1:, :-1] - x[..., :-1, 1:]
    diagonal = x[..., :-1, :-1] - x[..., 1:, 1:]
    return sum(torch.linalg.vector_norm(d, dim=dims) for d in (horizontal, vertical, anti_diagonal, diagonal))


def image_l2(x: Tensor) -> Tensor:
    """Mean over a group's images of each image's L2 norm: (G, B, C, H, W) -> (G,)."""
    return torch.linalg.vector_norm(x.flatten(2), dim=2).mean(dim=1)


def mixture_moments(freq: Tensor, class_mean: Tensor, class_var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of a mixture of classes with weights ``freq`` (G, K) from per-class moments (K, ch).

    mu = sum_c p_c mu_c and var = sum_c p_c (var_c + mu_c^2) - mu^2 (law of total variance).
    """
    mean = freq @ class_mean  # (G, ch)
    var = freq @ (class_var + class_mean.square()) - mean.square()  # (G, ch)
    return mean, var.clamp_min(0.0)


def label_frequencies(labels: Tensor, groups: int, num_classes: int) -> Tensor:
    """Fraction of each class among each group's labels: (G*B,) -> (G, num_classes)."""
    y = labels.reshape(groups, -1)  # (G, B)
    counts = torch.zeros(groups, num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, y, torch.ones_like(y, dtype=torch.float64))
    return counts / y.shape[1]


def jitter_flip(x: Tensor, shifts: Tensor, flips: Tensor) -> Tensor:
    """Per group: ``torch.roll`` by shifts[g] = (dy, dx) over (H, W), then a horizontal flip where flips[g].

    ``x`` is (G, B, C, H, W), ``shifts`` (G, 2) int, ``flips`` (G,) bool; one gather, differentiable.
    """
    g, b, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - shifts[:, :1]) % h  # (G, H): roll puts x[i] at i + s
    cols = (torch.arange(w, device=x.device) - shifts[:, 1:]) % w  # (G, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(g, 1, 1, h * w).expand(g, b, c, h * w)
    return x.reshape(g, b, c, h * w).gather(3, index).reshape(g, b, c, h, w)


def learning_rate(iteration: int, iterations: int, base_lr: float, warmup: int, cosine_factor: float) -> float:
    """Linear warm-up over ``warmup`` iterations, then ``base_lr * factor * (1 + cos(pi * progress))``.

    Same as DeepInversion's ``lr_cosine_policy`` (factor 0.5); the released CCSI code uses factor 0.2.
    """
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    progress = (iteration - warmup) / max(iterations - warmup, 1)
    return base_lr * cosine_factor * (1.0 + math.cos(math.pi * progress))


def impression_loss(
    teacher: nn.Module,
    layers: list[nn.BatchNorm2d],
    store: dict[int, Tensor],
    x: Tensor,
    y: Tensor,
    targets: list[tuple[Tensor, Tensor]],
    weights: LossWeights,
    fused_moments: bool = False,
) -> Tensor:
    """Loss terms (G, 5) = (ce, bn, tv, l2, total) of each group of already augmented images x (G, B, C, H, W).

    ``store`` comes from ``capture_bn_inputs(layers)``; ``targets[i]`` = (mean (G, ch), var (G, ch)) of layer i.
    ce, bn (= sum_i w_i R_i with w_0 = first_bn), tv and l2 are unweighted; total is the weighted sum.
    """
    g = x.shape[0]
    store.clear()
    logits = at_least_float32(teacher_logits(teacher(x.flatten(0, 1))))  # (G*B, n); float32 under autocast too
    ce = F.cross_entropy(logits, y, reduction="none").reshape(g, -1).mean(dim=1)
    bn = torch.zeros(g, device=x.device)
    for i, (target_mean, target_var) in enumerate(targets):
        if i not in store:
            raise ValueError(f"normalisation layer {i} ({layers[i]}) was not used in the teacher's forward pass")
        weight = weights.first_bn if i == 0 else 1.0
        bn = bn + weight * moment_loss(*group_moments(store[i], g, fused_moments), target_mean, target_var)
    store.clear()
    tv, l2 = total_variation(x), image_l2(x)
    total = weights.ce * ce + weights.bn * bn + weights.tv * tv + weights.l2 * l2
    return torch.stack([ce, bn, tv, l2, total], dim=1)
