"""scikit-learn's 8x8 digits (shipped with the package, no download): a small offline data set.

Pixels 0..16 are scaled to 0..255 and resized to 32x32 (bilinear), 1 channel, 10 classes. The
60% train / 10% val / 30% test split is stratified with a fixed seed, so it never changes between runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from dataloaders.image_set import DataSplits, ImageSet
from dataloaders.registry import register_dataset
from dataloaders.scenario import stratified_split
from experiment.config import Config

SPLIT_SEED = 0  # fixed: independent of the run's seed
FRACTIONS = (0.6, 0.1, 0.3)  # train, val, test
SIZE = 32


def digits_file() -> Path:
    """scikit-learn's digits file (1797 rows: 64 pixels 0..16 and the label), located without importing
    scikit-learn, whose import costs about a second in every process that loads digits."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed: pip install -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images (N, 1, 32, 32) uint8 and labels (N,) int64."""
    rows = np.loadtxt(digits_file(), delimiter=",")  # (1797, 65), what sklearn.datasets.load_digits reads
    x = torch.as_tensor(rows[:, :-1], dtype=torch.float32).reshape(-1, 1, 8, 8) * (255.0 / 16.0)  # (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)  # (N, 1, 32, 32)
    return x, torch.as_tensor(rows[:, -1], dtype=torch.long)


@register_dataset("digits")
def load_digits(cfg: Config) -> DataSplits:
    """Digits with its fixed stratified 60/10/30 split."""
    x, y = digits_images()
    train, val, test = (ImageSet(x[i], y[i]) for i in stratified_split(y, FRACTIONS, SPLIT_SEED))
    return DataSplits("digits", train, val, test, 10, [str(c) for c in range(10)])
