"""In-memory image data: uint8 tensors with integer labels, kept whole on one device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageSet:
    """Images ``x`` (N, C, H, W) and labels ``y`` (N,) int64.

    ``x`` is uint8 in [0, 255] for real data, or float32 in [0, 1] for synthetic images;
    ``as_float`` converts a batch of either to float32 in [0, 1].
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise ValueError(f"labels must be (N,) with N={len(self.x)}, got shape {tuple(self.y.shape)}")
        if self.y.dtype != torch.int64:
            self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.x.to(device), self.y.to(device))

    def subset(self, index: Tensor) -> ImageSet:
        """Rows selected by a boolean mask or an index tensor."""
        return ImageSet(self.x[index], self.y[index])

    def of_classes(self, classes: Tensor | list[int]) -> ImageSet:
        """The images whose label is in ``classes``."""
        classes = torch.as_tensor(classes, device=self.y.device)
        return self.subset(torch.isin(self.y, classes))

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        """Join sets of the same image dtype (uint8 with uint8, float with float)."""
        return ImageSet(torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]))


def as_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images to float32 [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@dataclass
class DataSplits:
    """A data set's train/val/test splits, as loaded (original labels, before any class order)."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    class_names: list[str]

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Side of square images, or (H, W) when they are not square."""
        h, w = (int(s) for s in self.train.x.shape[-2:])
        return h if h == w else (h, w)
