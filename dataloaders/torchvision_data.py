"""GTSRB and CIFAR-100, read from torchvision's on-disk layouts (``download: true`` fetches through torchvision).

The files are read here rather than through the torchvision classes. CIFAR-100's files are Python pickles, and
unpickling a file can run any code in it: each is first checked against torchvision's published MD5 checksums
and refused (one line) when it differs. Neither set has a validation split: ``val_fraction`` of train is carved
out, stratified, with the run's ``seed``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataloaders.image_set import DataSplits, ImageSet
from dataloaders.registry import register_dataset
from dataloaders.scenario import stratified_split
from experiment.config import Config, expand_path, few
from experiment.errors import DataError

log = logging.getLogger(__name__)

GTSRB_CLASSES = 43
CIFAR100_CLASSES = 100
GTSRB_SIZE = 32
# torchvision's published checksums of the CIFAR-100 files (its CIFAR100 class's train_list, test_list and meta;
# tests/dataloaders/test_dataloaders.py compares them). torchvision itself is imported only to download.
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


def _torchvision():
    """torchvision, imported only for a download (its import costs about a second at every start-up)."""
    import torchvision

    return torchvision


def carve_val(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split ``fraction`` of each class of ``train`` off as a validation set (seeded)."""
    keep, val = stratified_split(train.y, (1.0 - fraction, fraction), seed)
    return train.subset(keep), train.subset(val)


def _fetch(name: str, fetch, root: Path) -> None:
    """Run a torchvision download; turn its failure into a one-line DataError."""
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", name, root)
    try:
        fetch()
    except (RuntimeError, OSError, ValueError) as err:
        first = " ".join(str(err).split())[:200]
        raise DataError(f"{name}: download into {root}/ failed ({first}); fetch the files by hand") from None


# ----- CIFAR-100 -------------------------------------------------------------------------------


def _check_md5(path: Path) -> None:
    """Refuse a CIFAR-100 file whose MD5 is not torchvision's: it would be unpickled, which can run code."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise DataError(f"cifar100: cannot read {path} ({err.strerror})") from None
    expected = CIFAR100_MD5.get(path.name)
    if digest.hexdigest() != expected:
        raise DataError(
            f"cifar100: {path} is not torchvision's CIFAR-100 file (md5 {digest.hexdigest()}, expected {expected}); "
            "it would be unpickled, which can run code: delete it and download again (--download=true)"
        )


def _unpickle(path: Path) -> dict:
    _check_md5(path)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"cifar100: cannot read {path} ({err}); delete it and download again") from None


def _cifar_split(path: Path) -> ImageSet:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or b"data" not in entry or b"fine_labels" not in entry:
        raise DataError(f"cifar100: {path} lacks b'data' or b'fine_labels'; expected torchvision's CIFAR-100 files")
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[b"fine_labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"cifar100: {path} holds data {data.dtype} {data.shape} and {len(labels)} labels; "
            "expected uint8 (N, 3072) and N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= CIFAR100_CLASSES):
        raise DataError(f"cifar100: {path} has labels outside 0..{CIFAR100_CLASSES - 1}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32): rows are R, G, B planes
    return ImageSet(x, torch.as_tensor(labels, dtype=torch.long))


@register_dataset("cifar100")
def load_cifar100(cfg: Config) -> DataSplits:
    """CIFAR-100 from ``<data_root>/cifar-100-python/{train,test,meta}``."""
    root = expand_path("data_root", cfg.data_root)
    folder = root / "cifar-100-python"
    files = [folder / f for f in ("train", "test", "meta")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        if not cfg.download:
            raise DataError(f"cifar100: file {missing[0]} not found; set download: true (or --download=true)")
        _fetch("cifar100", lambda: _torchvision().datasets.CIFAR100(str(root), train=False, download=True), root)
    meta = _unpickle(folder / "meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"fine_label_names", [])]
    if len(names) != CIFAR100_CLASSES:
        raise DataError(f"cifar100: {folder / 'meta'} has {len(names)} fine_label_names; expected {CIFAR100_CLASSES}")
    train, val = carve_val(_cifar_split(folder / "train"), cfg.val_fraction, cfg.seed)
    return DataSplits("cifar100", train, val, _cifar_split(folder / "test"), CIFAR100_CLASSES, names)


# ----- GTSRB -----------------------------------------------------------------------------------


def _read_images(paths: list[Path]) -> torch.Tensor:
    """RGB images resized to 32x32 -> (N, 3, 32, 32) uint8 (one pass at load time)."""
    out = np.empty((len(paths), GTSRB_SIZE, GTSRB_SIZE, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as img:
                out[i] = np.asarray(img.convert("RGB").resize((GTSRB_SIZE, GTSRB_SIZE), Image.BILINEAR))
        except OSError as err:
            raise DataError(f"gtsrb: cannot read image {p} ({err}); check the files") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _gtsrb_train(folder: Path) -> ImageSet:
    """``Training/<class id, 5 digits>/*.ppm`` (each folder also holds its GT csv)."""
    paths, labels = [], []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not d.name.isdigit() or int(d.name) >= GTSRB_CLASSES:
            raise DataError(f"gtsrb: unexpected folder {d}; class folders are 00000..{GTSRB_CLASSES - 1:05d}")
        files = sorted(d.glob("*.ppm"))
        paths += files
        labels += [int(d.name)] * len(files)
    if not paths:
        raise DataError(f"gtsrb: no .ppm images under {folder}; delete the folder and download again")
    return ImageSet(_read_images(paths), torch.tensor(labels, dtype=torch.long))


def _gtsrb_test(images: Path, gt_csv: Path) -> ImageSet:
    """``Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv`` (';'-separated Filename, ClassId)."""
    with open(gt_csv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise DataError(f"gtsrb: {gt_csv} needs ';'-separated columns Filename and ClassId")
    try:
        labels = torch.tensor([int(r["ClassId"]) for r in rows], dtype=torch.long)
    except (TypeError, ValueError):
        raise DataError(f"gtsrb: {gt_csv} has a ClassId that is not an integer") from None
    outside = (labels < 0) | (labels >= GTSRB_CLASSES)
    if bool(outside.any()):
        bad = few(torch.unique(labels[outside]).tolist())
        raise DataError(f"gtsrb: {gt_csv} has ClassId {bad} outside 0..{GTSRB_CLASSES - 1}; check the file")
    paths = [images / r["Filename"] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"gtsrb: {len(missing)} test image(s) listed in {gt_csv} are missing, e.g. {missing[0]}")
    return ImageSet(_read_images(paths), labels)


@register_dataset("gtsrb")
def load_gtsrb(cfg: Config) -> DataSplits:
    """GTSRB in torchvision's layout under ``<data_root>/gtsrb/``, images resized to 32x32."""
    root = expand_path("data_root", cfg.data_root)
    base = root / "gtsrb"
    train_dir = base / "GTSRB" / "Training"
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    gt_csv = base / "GT-final_test.csv"
    missing = [
        p
        for p, ok in ((train_dir, train_dir.is_dir()), (test_dir, test_dir.is_dir()), (gt_csv, gt_csv.is_file()))
        if not ok
    ]
    if missing:
        if not cfg.download:
            raise DataError(f"gtsrb: {missing[0]} not found; set download: true (or --download=true)")
        for split in ("train", "test"):
            _fetch("gtsrb", lambda s=split: _torchvision().datasets.GTSRB(str(root), split=s, download=True), root)
    train, val = carve_val(_gtsrb_train(train_dir), cfg.val_fraction, cfg.seed)
    test = _gtsrb_test(test_dir, gt_csv)
    return DataSplits("gtsrb", train, val, test, GTSRB_CLASSES, [str(c) for c in range(GTSRB_CLASSES)])
