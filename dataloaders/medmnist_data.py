"""MedMNIST 2D single-label data sets, read from ``<data_root>/<flag>[_<size>].npz``.

Downloading (``download: true``) goes through the ``medmnist`` package's own code (URL and MD5 from
``medmnist.INFO``); reading goes through the shared ``.npz`` reader.
"""

from __future__ import annotations

import logging
from pathlib import Path

import medmnist
from medmnist import INFO
from medmnist.dataset import MedMNIST2D

from dataloaders.image_set import DataSplits
from dataloaders.npz_data import read_npz
from dataloaders.registry import Loader, register_dataset
from experiment.config import Config, expand_path
from experiment.errors import DataError

log = logging.getLogger(__name__)

# Every 2D flag whose task is single-label (ChestMNIST is multi-label: not class-incremental).
FLAGS = tuple(
    flag
    for flag, info in INFO.items()
    if issubclass(getattr(medmnist, info["python_class"]), MedMNIST2D) and "multi-label" not in info["task"]
)


def file_name(flag: str, size: int) -> str:
    """MedMNIST's file naming: ``bloodmnist.npz`` for 28 px, ``bloodmnist_64.npz`` for other sizes."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def download(flag: str, root: Path, size: int) -> None:
    """Fetch the file with medmnist's own download code (checks the MD5)."""
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (size %d) into %s", flag, size, root)
    dataset_class = getattr(medmnist, INFO[flag]["python_class"])
    try:
        dataset_class(split="val", download=True, root=str(root), size=size)  # "val": the smallest split to open
    except RuntimeError as err:
        url = INFO[flag]["url" if size == 28 else f"url_{size}"]
        first = " ".join(str(err).split())[:200]
        raise DataError(f"{flag}: download of {url} into {root}/ failed ({first}); fetch it by hand") from None


def load_medmnist(cfg: Config, flag: str) -> DataSplits:
    """One MedMNIST data set at ``medmnist_size`` px, class names from ``INFO[flag]["label"]``."""
    size = cfg.medmnist_size
    root = expand_path("data_root", cfg.data_root)
    path = root / file_name(flag, size)
    if not path.is_file():
        if not cfg.download:
            url = INFO[flag]["url" if size == 28 else f"url_{size}"]
            raise DataError(
                f"{flag}: file {path} not found; set download: true (or --download=true) or fetch {url} into {root}/"
            )
        download(flag, root, size)
    labels = INFO[flag]["label"]
    class_names = [labels[str(c)] for c in range(len(labels))]
    return read_npz(path, flag, class_names)


def _loader(flag: str) -> Loader:
    def load(cfg: Config) -> DataSplits:
        return load_medmnist(cfg, flag)

    load.__name__ = f"load_{flag}"
    load.__doc__ = f"MedMNIST {flag}."
    return load


for _flag in FLAGS:
    register_dataset(_flag)(_loader(_flag))
