"""Continual Normalization (Pham, Liu, Hoi, ICLR 2022): GroupNorm without affine, then BatchNorm.

The BatchNorm (``ContinualNorm.bn``) sees the group-normalised tensor, so its running buffers hold
statistics of the GN output. Synthesis code hooks the inputs of the BatchNorm2d layers returned by
``norm_layers``: for a CN model that input is the GN output, for a plain BN model the raw activation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ContinualNorm(nn.Module):
    """``bn(group_norm(x, groups))``: per-sample group normalisation, then batch normalisation (affine)."""

    def __init__(self, num_features: int, groups: int = 4, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if groups < 1 or num_features % groups != 0:
            raise ValueError(f"ContinualNorm: num_features={num_features} is not divisible by groups={groups}")
        self.num_features = num_features
        self.groups = groups
        self.eps = eps
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.group_norm(x, self.groups, None, None, self.eps))

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"


def _to_cn(bn: nn.BatchNorm2d, groups: int, momentum: float) -> ContinualNorm:
    """A ContinualNorm whose BatchNorm keeps ``bn``'s parameters, buffers, eps and train/eval mode."""
    cn = ContinualNorm(bn.num_features, groups=groups, momentum=momentum, eps=bn.eps)
    cn.bn = nn.BatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    cn.bn.load_state_dict(bn.state_dict())
    ref = next(iter(bn.parameters()), None)
    if ref is None:
        ref = next(iter(bn.buffers()), None)
    if ref is not None:
        cn.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    return cn.train(bn.training)


def convert_bn_to_cn(model: nn.Module, groups: int = 4, momentum: float = 0.1) -> nn.Module:
    """Replace every nn.BatchNorm2d of ``model`` (recursively, in place) by a ContinualNorm; return the model.

    BatchNorms already inside a ContinualNorm are left alone, so converting twice changes nothing.
    """
    if isinstance(model, nn.BatchNorm2d):
        return _to_cn(model, groups, momentum)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, _to_cn(child, groups, momentum))
        elif not isinstance(child, ContinualNorm):
            convert_bn_to_cn(child, groups, momentum)
    return model


def norm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every nn.BatchNorm2d of ``model`` in registration (= forward) order; for CN, the ``.bn`` of each layer."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
