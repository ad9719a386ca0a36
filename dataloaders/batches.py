"""Batches drawn straight from in-memory tensors: shuffling, mixing, augmentation on the batch.

No per-sample Python: indices for a whole epoch are drawn at once, images are gathered by
indexing, and augmentation (random crop after zero padding, horizontal flip) is applied to the
batch tensor on the device it lives on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

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
    unchanged (no augmentation): per-image results computed once can then be looked up. ``draws`` (B,) are the
    training step's per-row draws the loader made with the epoch (``RowDraws``). ``valid`` (B,) bool flags the rows
    that count when the batch is padded (``BatchLoader(pad=True)``: False on the padding); None: every row counts."""

    x: Tensor
    y: Tensor
    synthetic: Tensor
    shard: BatchShard = WHOLE_BATCH
    index: Tensor | None = None  # (B,) row of each image in its source; None when augmented or unknown
    draws: Tensor | None = None  # (B,) the step's draws made with the epoch; None: none made
    valid: Tensor | None = None  # (B,) bool, False on padding rows; None: no padding, every row counts

    def __len__(self) -> int:
        return len(self.y)

    def draw_rows(self, high: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integers in [0, high), one per row, drawn for the global batch (see ``BatchShard``)."""
        return self.shard.draw_rows(len(self), high, generator)


def crop_offsets(n: int, padding: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random crop offsets (n,), (n,) in [0, 2 * padding], rows then columns, drawn on the host."""
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return oy, ox


def crop_at(x: Tensor, padding: int, oy: Tensor, ox: Tensor) -> Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at offsets ``oy``, ``ox`` (B,) (on x's device)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at a random offset per image."""
    if padding == 0:
        return x
    oy, ox = crop_offsets(len(x), padding, generator)
    return crop_at(x, padding, oy.to(x.device), ox.to(x.device))


def flip_draws(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Which of n images to flip (n,) bool, each with probability 0.5, drawn on the host."""
    return torch.rand(n, generator=generator) < 0.5


def flip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Images flipped horizontally where ``flip`` (B,) bool (on x's device)."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image horizontally with probability 0.5."""
    return flip_where(x, flip_draws(len(x), generator).to(x.device))


def augment_batch(x: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode == "crop_flip":
        x = random_crop(x, 4, generator)
    if mode in ("flip", "crop_flip"):
        x = random_flip(x, generator)
    return x


class RowDraws:
    """One uniform integer in [0, ``high``) per row of every batch of an epoch, for a training step that would
    call ``Batch.draw_rows(high, generator)``: a ``BatchLoader`` with ``row_draws`` makes the draws when it
    prepares the epoch, after each batch's augmentation draws (the order per-step calls draw in), copies them
    to ``device`` once and hands each batch its draws as ``Batch.draws`` (``next``); a shard gets its rows of the
    global batch's draws (``distributed.shard_batch``), as ``draw_rows``. Batches of fewer than ``min_rows`` rows
    (skipped under torchrun) draw nothing.
    """

    def __init__(self, high: int, device: torch.device | str | None = None, min_rows: int = 1):
        if high < 1:
            raise ValueError(f"RowDraws: high must be >= 1, got {high}")
        self.high, self.device, self.min_rows = high, device, min_rows
        self.table: Tensor | None = None  # (rows drawn this epoch,) on ``device``
        self.offset = 0

    def draw(self, n: int, generator: torch.Generator | None) -> Tensor | None:
        """The draws of one batch of ``n`` rows (on the host), or None for a batch that is skipped."""
        return torch.randint(0, self.high, (n,), generator=generator) if n >= self.min_rows else None

    def start(self, draws: list[Tensor]) -> None:
        """Hold an epoch's draws (one host tensor per batch) on the device, from the first batch's."""
        table = torch.cat(draws) if draws else torch.empty(0, dtype=torch.long)
        self.table, self.offset = table.to(self.device), 0

    def next(self, n: int) -> Tensor | None:
        """The next batch's draws (``n`` rows of the global batch) on ``device``; None for a batch that drew none."""
        if self.table is None:
            raise RuntimeError("RowDraws.next before the loader prepared an epoch (iterate the BatchLoader first)")
        if n < self.min_rows:
            return None
        if self.offset + n > len(self.table):
            raise RuntimeError(f"RowDraws: the epoch drew {len(self.table)} rows, a batch asks past {self.offset}")
        rows = self.table[self.offset : self.offset + n]
        self.offset += n
        return rows


class BatchLoader:
    """One epoch of batches over real images, optionally mixed with synthetic ones.

    Without ``synthetic`` it is a (shuffled) pass over ``real``. With it, it draws with
    replacement so that a fraction ``synthetic_ratio`` of samples is synthetic (CCSI's weighted
    sampler), for an epoch of ``len(real) / (1 - synthetic_ratio)`` samples.

    ``iter()`` prepares the epoch: its indices and the real/synthetic placement are drawn and worked out on the
    host and copied to the devices once, so that a batch (``next``) makes no host sync when the images live on
    ``device``. The augmentation's draws are made per batch, unless ``epoch_draws`` (or ``row_draws``, the
    training step's per-row draws, see ``RowDraws``): then they are drawn for the whole epoch when it starts, in
    the same order, and copied once. Set it only when nothing else draws from ``generator`` during the epoch.

    ``pad``: the epoch's ragged last batch is padded to ``batch_size`` rows by repeating its rows in order (padding
    row i repeats row i mod n), and every batch carries ``valid``: each step then has the same shapes (a captured
    step, ``compile: graphs``). Losses must leave the padding out (``valid``); normalisation layers in train mode
    still see the repeated rows in that one batch's statistics (rows of the batch itself, not zeros).
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
        epoch_draws: bool = False,
        row_draws: RowDraws | None = None,
        pad: bool = False,
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
        self.epoch_draws = epoch_draws
        self.row_draws = row_draws
        self.pad = pad
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

    def _augmentation_draws(self) -> dict[str, Tensor]:
        """The epoch's crop offsets and flips (N,) drawn batch by batch as ``augment_batch`` would (with the
        step's ``row_draws`` after each batch's), on the device; nothing for ``augment: none``."""
        g, bs, crops, flips, rows = self.generator, self.batch_size, [], [], []
        for start in range(0, self.num_samples, bs):
            b = min(bs, self.num_samples - start)
            if self.augment == "crop_flip":
                crops.append(torch.stack(crop_offsets(b, 4, g)))  # (2, b)
            if self.augment in ("flip", "crop_flip"):
                flips.append(flip_draws(b, g))
            if self.row_draws is not None:
                drawn = self.row_draws.draw(b, g)
                rows += [] if drawn is None else [drawn]
        if self.row_draws is not None:
            self.row_draws.start(rows)
        out = {}
        if crops:
            out["crop"] = torch.cat(crops, 1).to(self.device)  # (2, N)
        if flips:
            out["flip"] = torch.cat(flips).to(self.device)  # (N,)
        return out

    def __iter__(self) -> Iterator[Batch]:
        is_syn, index = self._draw()
        aug = self._augmentation_draws() if self.epoch_draws or self.row_draws is not None else None
        mixed = self._placement(is_syn, index) if self.synthetic is not None else None
        return self._batches(is_syn.to(self.device), index, aug, mixed)

    def _batches(
        self, is_syn: Tensor, index: Tensor, aug: dict[str, Tensor] | None, mixed: list | None
    ) -> Iterator[Batch]:
        """The epoch's batches from its prepared draws: slices and gathers on the devices only."""
        real_x, real_y = self.real.x, self.real.y
        real_idx = index.to(real_x.device) if mixed is None else None
        rows_idx = index.to(self.device) if self.augment == "none" else None  # unchanged images: their rows
        for k, start in enumerate(range(0, self.num_samples, self.batch_size)):
            end = min(start + self.batch_size, self.num_samples)
            if mixed is None:
                assert real_idx is not None
                i = real_idx[start:end]
                x, y = as_float(real_x[i]), real_y[i]
            else:
                x, y = self._gather_mixed(end - start, mixed, k)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if aug is not None:
                if "crop" in aug:
                    x = crop_at(x, 4, aug["crop"][0, start:end], aug["crop"][1, start:end])
                if "flip" in aug:
                    x = flip_where(x, aug["flip"][start:end])
            elif self.augment != "none":
                x = augment_batch(x, self.augment, self.generator)
            rows = None if rows_idx is None else rows_idx[start:end]
            draws = None if self.row_draws is None else self.row_draws.next(end - start)
            batch = Batch(x, y, is_syn[start:end], index=rows, draws=draws)
            yield self._padded(batch) if self.pad else batch

    def _padded(self, batch: Batch) -> Batch:
        """``batch`` grown to ``batch_size`` rows by repeating its rows in order, ``valid`` False on the repeats."""
        n, size = len(batch), self.batch_size
        at = torch.arange(size, device=self.device)
        if n == size:
            return replace(batch, valid=at < n)
        rep = at % n  # (size,) padding row i repeats row i mod n

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rep.to(t.device)]

        return Batch(
            batch.x[rep],
            batch.y[rep],
            batch.synthetic[rep],
            index=pick(batch.index),
            draws=pick(batch.draws),
            valid=at < n,
        )

    def _placement(self, is_syn: Tensor, index: Tensor) -> list[tuple[ImageSet, Tensor, Tensor, list[int]]]:
        """Per source (real, then synthetic): its rows' indices in the source (on the source's device), their
        positions within their batch (on ``device``) and where each batch's rows start (host ints), in epoch order."""
        assert self.synthetic is not None
        n_batches = len(self)
        out = []
        for source, mask in ((self.real, ~is_syn), (self.synthetic, is_syn)):
            at = mask.nonzero().squeeze(1)  # (n,) rows of the epoch from this source, in order
            counts = torch.bincount(at // self.batch_size, minlength=n_batches)
            bounds = [0, *torch.cumsum(counts, 0).tolist()]  # once per epoch, on the host
            out.append((source, index[at].to(source.x.device), (at % self.batch_size).to(self.device), bounds))
        return out

    def _gather_mixed(self, n: int, mixed: list, k: int) -> tuple[Tensor, Tensor]:
        """Batch ``k`` (``n`` rows) of the mixed epoch: each source's rows gathered by the prepared indices and put
        in place by index_copy_, no host sync (the row counts per batch are host ints worked out per epoch)."""
        x, y = None, torch.empty(n, dtype=torch.long, device=self.device)
        for source, src, at, bounds in mixed:
            i = src[bounds[k] : bounds[k + 1]]
            xs = as_float(source.x[i]).to(self.device)  # (n_source, C, H, W)
            if x is None:
                x = torch.empty((n, *xs.shape[1:]), device=self.device)
            pos = at[bounds[k] : bounds[k + 1]]
            x.index_copy_(0, pos, xs)
            y.index_copy_(0, pos, source.y[i.to(source.y.device)].to(self.device))
        assert x is not None
        return x, y
