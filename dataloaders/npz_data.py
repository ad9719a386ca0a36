"""Any data set stored in MedMNIST's ``.npz`` format (``dataset: npz`` with ``data_path``).

The file holds ``{train,val,test}_images`` (N, H, W) or (N, H, W, C) uint8 and ``{train,val,test}_labels``
(N,) or (N, 1) integers. 28x28 images are zero-padded by 2 px on each side to 32x32 (as in CCSI);
other sizes are kept. ``read_npz`` is shared with the MedMNIST loader.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from dataloaders.image_set import DataSplits, ImageSet
from dataloaders.registry import register_dataset
from experiment.config import Config, expand_path
from experiment.errors import DataError, what_file_is

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
EXPECTED = "expected a MedMNIST-format .npz (a zip of {train,val,test}_images and _labels arrays, from np.savez)"


def images_to_tensor(images: np.ndarray, pad_28: bool = True) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 array -> (N, C, H, W) uint8 tensor; 28x28 padded to 32x32."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    if pad_28 and x.shape[-2:] == (28, 28):
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.contiguous()


def _check_images(name: str, key: str, images: np.ndarray) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"{name}: '{key}' has dtype {images.dtype}; expected uint8 images with values 0..255")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(
            f"{name}: '{key}' has shape {images.shape}; expected N x H x W (grey) or N x H x W x C with C = 1 or 3 "
            "(3D volumes are not supported)"
        )


def _check_labels(name: str, key: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """Validate one label array and return it as (N,) int64."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: '{key}' has dtype {labels.dtype}; expected integer class labels")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{name}: '{key}' has shape {labels.shape}: multi-label data (e.g. ChestMNIST) is not supported in "
            "class-incremental learning; use a single-label data set"
        )
    if labels.ndim not in (1, 2):
        raise DataError(f"{name}: '{key}' has shape {labels.shape}; expected (N,) or (N, 1) labels")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n_images:
        raise DataError(f"{name}: '{key}' has {len(labels)} labels but there are {n_images} images")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{name}: '{key}' has negative label {labels.min()}; expected classes 0..C-1")
    return labels


def _load_arrays(path: Path, name: str) -> dict[str, np.ndarray]:
    """The six arrays of a MedMNIST-format file; a DataError saying what the file is when it is not one."""
    if path.is_dir():
        raise DataError(f"{name}: {path} is a folder; {EXPECTED}")
    if not path.is_file():
        raise DataError(f"{name}: file {path} not found; set data_path to a MedMNIST-format .npz file")
    try:
        with path.open("rb") as f:
            kind = what_file_is(f.read(64), "a .npz archive")
        if kind is not None:
            raise DataError(f"{name}: {path} {kind}; {EXPECTED}")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in REQUIRED_KEYS if k not in data.files]
            if missing:
                raise DataError(
                    f"{name}: {path} lacks key(s) {', '.join(missing)}; a MedMNIST-format .npz holds "
                    f"{', '.join(REQUIRED_KEYS)} (found: {', '.join(data.files) or 'none'})"
                )
            return {k: data[k] for k in REQUIRED_KEYS}
    except ValueError as err:
        if "allow_pickle" in str(err):  # numpy refuses object arrays unless unpickling is allowed
            raise DataError(
                f"{name}: {path} holds arrays of Python objects; expected uint8 images and integer labels"
            ) from None
        raise DataError(f"{name}: {path} cannot be read as a .npz ({err}); {EXPECTED}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise DataError(f"{name}: {path} is a damaged or truncated .npz ({reason}); {EXPECTED}") from None


def read_npz(path: Path, name: str, class_names: list[str] | None = None) -> DataSplits:
    """Read and validate a MedMNIST-format file.

    Without ``class_names`` the classes are 0..C-1 with C = max training label + 1, named "0".."C-1".
    """
    arrays = _load_arrays(path, name)

    labels = {}
    for split in SPLITS:
        _check_images(name, f"{split}_images", arrays[f"{split}_images"])
        labels[split] = _check_labels(
            name, f"{split}_labels", arrays[f"{split}_labels"], len(arrays[f"{split}_images"])
        )
    shapes = {s: (*arrays[f"{s}_images"].shape[1:], 1)[:3] for s in SPLITS}  # (H, W, C) per split
    if len(set(shapes.values())) > 1:
        raise DataError(f"{name}: the splits of {path} have different image shapes (H, W, C) {shapes}")
    if len(labels["train"]) == 0:
        raise DataError(f"{name}: {path} has no training images (train_images is empty)")
    if class_names is None:
        class_names = [str(c) for c in range(int(labels["train"].max()) + 1)]

    sets = {s: ImageSet(images_to_tensor(arrays[f"{s}_images"]), torch.from_numpy(labels[s])) for s in SPLITS}
    return DataSplits(name, sets["train"], sets["val"], sets["test"], len(class_names), list(class_names))


def npz_files(cfg: Config) -> list[Path]:
    """The file ``dataset: npz`` reads (for the provenance): ``data_path``."""
    return [] if cfg.data_path is None else [expand_path("data_path", cfg.data_path)]


@register_dataset("npz", files=npz_files)
def load_npz(cfg: Config) -> DataSplits:
    """The file named by ``data_path``."""
    if cfg.data_path is None:
        raise DataError("dataset npz needs data_path: set data_path to a MedMNIST-format .npz file")
    return read_npz(expand_path("data_path", cfg.data_path), "npz")
