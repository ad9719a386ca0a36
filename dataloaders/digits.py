"""scikit-learn's 8x8 digits (shipped with the package, no download): a small offline data set.

Pixels 0..16 are scaled to 0..255 and resized to 32x32 (bilinear), 1 channel, 10 classes. The
60% train / 10% val / 30% test split is stratified with a fixed seed, so it never changes between runs.
"""

from __future__ import annotations

import torch

from dataloaders.image_set import DataSplits, ImageSet
from dataloaders.registry import register_dataset
from dataloaders.scenario import stratified_split
from experiment.config import Config

SPLIT_SEED = 0  # fixed: independent of the run's seed
FRACTIONS = (0.6, 0.1, 0.3)  # train, val, test
SIZE = 32


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images (N, 1, 32, 32) uint8 and labels (N,) int64."""
    from sklearn.datasets import load_digits as sklearn_digits  # here: scikit-learn (and pandas) cost ~1 s to import

    data = sklearn_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)  # (N, 1, 32, 32)
    return x, torch.as_tensor(data.target, dtype=torch.long)


@register_dataset("digits")
def load_digits(cfg: Config) -> DataSplits:
    """Digits with its fixed stratified 60/10/30 split."""
    x, y = digits_images()
    train, val, test = (ImageSet(x[i], y[i]) for i in stratified_split(y, FRACTIONS, SPLIT_SEED))
    return DataSplits("digits", train, val, test, 10, [str(c) for c in range(10)])
