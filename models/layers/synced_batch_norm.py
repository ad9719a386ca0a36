"""Batch normalisation whose training-mode statistics span every rank's shard of the global batch.

Under torchrun each rank holds part of a batch; plain BatchNorm would normalise by its part's
statistics. ``SyncedBatchNorm2d`` all-reduces the per-channel sums (differentiably, so gradients flow
through the shared statistics) and normalises by the global batch's mean and biased variance, updating
the running buffers as BatchNorm2d would for the whole batch. It works with gloo (CPU) and nccl, unlike
``torch.nn.SyncBatchNorm`` (CUDA only), and stays a BatchNorm2d: same parameters, buffers, state_dict
keys and eval behaviour, so checkpoints and the synthesis hooks are unchanged. In eval mode, without a
``sum_over_ranks`` or for a module with ``track_running_stats=False`` it is plain BatchNorm2d. The sum over
ranks is given by distributed.py (this module does not know about processes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

SumOverRanks = Callable[[Tensor], Tensor]


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics summed over all ranks by ``sum_over_ranks`` (differentiable)."""

    sum_over_ranks: SumOverRanks | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.sum_over_ranks is not None and self.track_running_stats):
            return super().forward(x)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32
        count = xf.new_tensor([x.numel() / c])  # values per channel on this rank
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])  # (2C + 1,)
        stats = self.sum_over_ranks(stats)  # (2C + 1,) over all ranks
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as used to normalise
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module, sum_over_ranks: SumOverRanks) -> int:
    """Replace every plain BatchNorm2d inside ``module`` by a SyncedBatchNorm2d sharing its parameters and
    buffers (in place, so an optimiser built later sees the same tensors) and summing its statistics with
    ``sum_over_ranks``; returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncedBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            synced.weight, synced.bias = child.weight, child.bias
            synced.running_mean, synced.running_var = child.running_mean, child.running_var
            synced.num_batches_tracked = child.num_batches_tracked
            synced.sum_over_ranks = sum_over_ranks
            synced.train(child.training)
            setattr(module, name, synced)
            replaced += 1
        else:
            replaced += sync_batch_norm(child, sum_over_ranks)
    return replaced
