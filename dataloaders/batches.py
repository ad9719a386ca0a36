"""Batches drawn straight from in-memory tensors: shuffling, mixing, augmentation on the batch.

No per-sample Python: indices for a whole epoch are drawn at once, images are gathered by
indexing, and augmentation (random crop after zero padding, horizontal flip) is applied to the
batch tensor on the device it lives on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dataloaders.image_set import ImageSet, as_float

AUGMENTATIONS = ("none", "flip", "crop_flip")


@dataclass(frozen=True)
class BatchShard:
    """Where a batch sits in the global batch of one optimiser step.

    One process holds the whole batch: sums over the batch are plain sums. Under torchrun each rank holds
    ``rows`` of a global batch of ``size`` rows, and distributed.py supplies ``sum_over_ranks``
    (differentiable). Losses that are not a mean over samples (a weighted mean, a mean over some rows, class
    centroids) take the shard and form their sums with ``total``; per-row random draws use ``draw_rows``, so
    every rank draws for the global batch and its random stream stays in step.
    """

    rows: slice | None = None  # None: this process holds the whole batch
    size: int = 0  # rows of the global batch (when ``rows`` is set)
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None

    @property
    def whole(self) -> bool:
        return self.rows is None

    def total(self, x: Tensor) -> Tensor:
        """Sum over the global batch of this process's partial sum ``x`` (``x`` itself for a whole batch)."""
        return x if self.sum_over_ranks is None else self.sum_over_ranks(x)

    def draw_rows(self, n: int, high: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integers in [0, high), one per row of this process's ``n`` rows, drawn for the global batch."""
        if self.rows is None:
            return torch.randint(0, high, (n,), generator=generator)
        return torch.randint(0, high, (self.size,), generator=generator)[self.rows]


WHOLE_BATCH = BatchShard()


@dataclass
class Batch:
    """Float images (B, C, H, W) in [0, 1], labels (B,), which rows are synthetic (B,) bool, and the ``shard``
    of the global batch this is (the whole batch outside torchrun). ``index`` (B,) says which image of its
    source (the real set, or the synthetic set where ``synthetic``) each row is, when the rows are those images
    unchanged (no augmentation): per-image results computed once can then be looked up."""

    x: Tensor
    y: Tensor
    synthetic: Tensor
    shard: BatchShard = WHOLE_BATCH
    index: Tensor | None = None  # (B,) row of each image in its source; None when augmented or unknown

    def __len__(self) -> int:
        return len(self.y)

    def draw_rows(self, high: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integers in [0, high), one per row, drawn for the global batch (see ``BatchShard``)."""
        return self.shard.draw_rows(len(self), high, generator)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at a random offset per image."""
    if padding == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image horizontally with probability 0.5."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode == "crop_flip":
        x = random_crop(x, 4, generator)
    if mode in ("flip", "crop_flip"):
        x = random_flip(x, generator)
    return x


class BatchLoader:
    """One epoch of batches over real images, optionally mixed with synthetic ones.

    Without ``synthetic`` it is a (shuffled) pass over ``real``. With it, it draws with
    replacement so that a fraction ``synthetic_ratio`` of samples is synthetic (CCSI's weighted
    sampler), for an epoch of ``len(real) / (1 - synthetic_ratio)`` samples.
    """

    def __init__(
        self,
        real: ImageSet,
        batch_size: int,
        shuffle: bool = True,
        augment: str = "none",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        synthetic: ImageSet | None = None,
        synthetic_ratio: float = 0.0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if synthetic is not None and not 0.0 <= synthetic_ratio < 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1), got {synthetic_ratio}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.real = real
        self.synthetic = synthetic if synthetic is not None and len(synthetic) > 0 else None
        self.ratio = synthetic_ratio if self.synthetic is not None else 0.0
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.device = torch.device(device) if device is not None else real.x.device
        if self.synthetic is None:
            self.num_samples = len(real)
        else:
            self.num_samples = round(len(real) / (1.0 - self.ratio))

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _draw(self) -> tuple[Tensor, Tensor]:
        """Indices for the epoch: (source is synthetic (N,) bool, index within its source (N,))."""
        n, g = self.num_samples, self.generator
        if self.synthetic is None:
            index = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            return torch.zeros(n, dtype=torch.bool), index
        is_syn = torch.rand(n, generator=g) < self.ratio
        real_idx = torch.randint(0, len(self.real), (n,), generator=g)
        syn_idx = torch.randint(0, len(self.synthetic), (n,), generator=g)
        return is_syn, torch.where(is_syn, syn_idx, real_idx)

    def __iter__(self) -> Iterator[Batch]:
        is_syn, index = self._draw()
        real_x, real_y = self.real.x, self.real.y
        for start in range(0, self.num_samples, self.batch_size):
            syn = is_syn[start : start + self.batch_size]
            idx = index[start : start + self.batch_size]
            if self.synthetic is None:
                i = idx.to(real_x.device)
                x, y = as_float(real_x[i]), real_y[i]
            else:
                x, y = self._gather_mixed(syn, idx)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            rows = idx.to(self.device, non_blocking=True) if self.augment == "none" else None  # unchanged images
            if self.augment != "none":
                x = augment_batch(x, self.augment, self.generator)
            yield Batch(x, y, syn.to(self.device), index=rows)

    def _gather_mixed(self, syn: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows from both sources placed by index_copy_ at positions found on the host: no device sync."""
        assert self.synthetic is not None
        x, y = None, torch.empty(len(idx), dtype=torch.long, device=self.device)
        for source, rows in ((self.real, (~syn).nonzero().squeeze(1)), (self.synthetic, syn.nonzero().squeeze(1))):
            xs = as_float(source.x[idx[rows].to(source.x.device)]).to(self.device)  # (n, C, H, W)
            if x is None:
                x = torch.empty((len(idx), *xs.shape[1:]), device=self.device)
            at = rows.to(self.device, non_blocking=True)
            x.index_copy_(0, at, xs)
            y.index_copy_(0, at, source.y[idx[rows].to(source.y.device)].to(self.device))
        assert x is not None
        return x, y
