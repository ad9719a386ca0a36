"""Data sets as in-memory tensors and their class-incremental split.

``load_dataset(cfg)`` returns a ``DataSplits`` with original labels 0..C-1 and uint8 images
(N, C, H, W); ``prepare(cfg)`` also builds the ``Scenario`` and remaps labels to class-order
positions, so task t's classes are ``scenario.classes_of_task(t)``. Loaders register themselves
with ``@register_dataset(name)`` (dataloaders/registry.py); the ``dataset`` key accepts exactly the
registered names. No optional package is imported here: ``medmnist`` only when a MedMNIST file is downloaded.
"""

from __future__ import annotations

import logging

import torch

from dataloaders import digits, medmnist_data, npz_data, torchvision_data  # noqa: F401  (each registers itself)
from dataloaders.image_set import DataSplits, ImageSet
from dataloaders.registry import DATASETS, register_dataset
from dataloaders.scenario import Scenario
from experiment.config import Config, ConfigError, Option, few, register_options
from experiment.errors import DataError

log = logging.getLogger(__name__)

register_options(
    "data",
    [
        Option("dataset", "str", "digits", "data set to learn (digits is offline, for tests)", choices=tuple(DATASETS)),
        Option("data_root", "str", "data", "folder holding the data set files", scope="run"),
        Option("download", "bool", False, "fetch missing data set files (MedMNIST, GTSRB, CIFAR-100)", scope="run"),
        Option("data_path", "str", None, "path of a MedMNIST-format .npz file for dataset: npz", nullable=True),
        Option("nb_cl_fg", "int", 2, "number of classes in the first task", min=1),
        Option("nb_cl", "int", 2, "number of classes per later task; the last task takes the remainder", min=1),
        Option("class_order", "int_list", None, "explicit class order (a permutation of 0..C-1)", nullable=True),
        Option("shuffle_classes", "bool", False, "shuffle 0..C-1 with seed when class_order is null"),
        Option(
            "medmnist_size", "int", 28, "MedMNIST image size in px (28 is padded to 32)", choices=(28, 64, 128, 224)
        ),
        Option(
            "val_fraction",
            "float",
            0.1,
            "fraction of train held out (stratified, seeded) as val for sets without a val split (gtsrb, cifar100)",
            min=0.0,
            max=0.5,
        ),
    ],
)


def _check_splits(data: DataSplits) -> None:
    """Reject loader output that the engine could not use: wrong dtype, labels out of range, empty classes."""
    shapes = set()
    last = data.num_classes - 1
    for split in ("train", "val", "test"):
        s: ImageSet = getattr(data, split)
        if s.x.dtype != torch.uint8:
            raise DataError(f"{data.name}: {split} images have dtype {s.x.dtype}; expected uint8")
        shapes.add(tuple(s.x.shape[1:]))
        outside = (s.y < 0) | (s.y > last)
        if bool(outside.any()):
            stray = torch.unique(s.y[outside]).tolist()
            known, fix = (
                ("classes", "") if split == "train" else ("training classes", " or add training images of them")
            )
            raise DataError(
                f"{data.name}: the {split} split has {int(outside.sum())} image(s) with label(s) {few(stray)}, "
                f"outside the {known} 0..{last}; remove those images{fix}"
            )
    if len(shapes) > 1:
        raise DataError(f"{data.name}: train/val/test image shapes differ: {sorted(shapes)}")
    if len(data.class_names) != data.num_classes:
        raise DataError(f"{data.name}: {len(data.class_names)} class names for {data.num_classes} classes")
    _check_every_class_in(data, "train")
    _check_every_class_in(data, "test")


def _check_every_class_in(data: DataSplits, split: str) -> None:
    """Every class 0..C-1 needs training images, and test images for its accuracy after each task."""
    counts = torch.bincount(getattr(data, split).y, minlength=data.num_classes)
    absent = torch.nonzero(counts == 0).flatten().tolist()
    if not absent:
        return
    if split == "test" and len(data.test) == 0:
        raise DataError(
            f"{data.name}: the test split is empty; the evaluation after each task needs test images of every class"
        )
    names = few(f"{c} ({data.class_names[c]})" if data.class_names[c] != str(c) else c for c in absent)
    need = "training images" if split == "train" else "test images (its accuracy is measured after each task)"
    raise DataError(
        f"{data.name}: class(es) {names} have no image in the {split} split; every class 0..{data.num_classes - 1} "
        f"needs {need}: add images of those classes or relabel the data without them"
    )


def check_run_splits(cfg: Config, data: DataSplits, scenario: Scenario) -> None:
    """Refuse a val split that model selection or a plateau scheduler reads but that holds no image of task 1.

    Labels of ``data`` are class-order positions (after ``prepare``). Classes absent from val only warn.
    """
    readers = []  # (what reads val, the setting that stops it)
    if cfg.select_on == "val":
        readers.append(("select_on=val picks the epoch of each task on it", "--select_on=last"))
    if cfg.select_on != "test" and cfg.scheduler.startswith("plateau"):  # the plateau scheduler steps on val
        readers.append((f"scheduler={cfg.scheduler} steps on its accuracy", "--scheduler=none (or step, cosine)"))
    if not readers:
        return
    reason, fix = " and ".join(r for r, _ in readers), " ".join(f for _, f in readers)
    first = scenario.classes_of_task(1)  # class-order positions
    if len(data.val.of_classes(first)) == 0:
        classes = few(scenario.class_order[p] for p in first)
        what = "is empty" if len(data.val) == 0 else f"holds no image of task 1's classes {classes}"
        raise DataError(f"{data.name}: the val split {what}, but {reason}; use {fix} or give the data set val images")
    counts = torch.bincount(data.val.y.cpu(), minlength=data.num_classes)
    absent = [scenario.class_order[p] for p in torch.nonzero(counts == 0).flatten().tolist()]
    if absent:
        log.warning("%s: class(es) %s have no val image; the accuracy on val ignores them", data.name, few(absent))


def load_dataset(cfg: Config) -> DataSplits:
    """The configured data set with its original labels 0..C-1 and uint8 images (N, C, H, W)."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    data = DATASETS[cfg.dataset](cfg)
    _check_splits(data)
    log.info(
        "data set %s: %d classes, images %s, train %d / val %d / test %d",
        data.name,
        data.num_classes,
        tuple(data.train.x.shape[1:]),
        len(data.train),
        len(data.val),
        len(data.test),
    )
    return data


def build_scenario(cfg: Config, num_classes: int) -> Scenario:
    """Class order and task sizes from ``nb_cl_fg``, ``nb_cl``, ``class_order``, ``shuffle_classes``, ``seed``."""
    return Scenario.build(num_classes, cfg.nb_cl_fg, cfg.nb_cl, cfg.class_order, cfg.shuffle_classes, cfg.seed)


def prepare(cfg: Config) -> tuple[DataSplits, Scenario]:
    """Load the data set and the scenario, with labels remapped to class-order positions.

    ``class_names`` keep the original order: remapped label p is named ``class_names[scenario.class_order[p]]``.
    """
    data = load_dataset(cfg)
    scenario = build_scenario(cfg, data.num_classes)

    def remapped(s: ImageSet) -> ImageSet:
        return ImageSet(s.x, scenario.remap(s.y))

    train, val, test = remapped(data.train), remapped(data.val), remapped(data.test)
    return DataSplits(data.name, train, val, test, data.num_classes, data.class_names), scenario


__all__ = [
    "DATASETS",
    "DataSplits",
    "ImageSet",
    "Scenario",
    "build_scenario",
    "check_run_splits",
    "load_dataset",
    "prepare",
    "register_dataset",
]
