"""The data set registry: ``@register_dataset(name)`` makes ``fn(cfg) -> DataSplits`` loadable as ``dataset: name``."""

from __future__ import annotations

from collections.abc import Callable

from dataloaders.image_set import DataSplits
from experiment.config import Config

Loader = Callable[[Config], DataSplits]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register a loader under ``name`` (a duplicate name is an error)."""

    def add(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = fn
        return fn

    return add
