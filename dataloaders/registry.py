"""The data set registry: ``@register_dataset(name)`` makes ``fn(cfg) -> DataSplits`` loadable as ``dataset: name``.

A data set read from files names them with ``files=`` (``fn(cfg) -> list[Path]``): the run's provenance records
their paths and sha256 (experiment/provenance.py, which imports no data set code, keeps the lookup).
"""

from __future__ import annotations

from collections.abc import Callable

from dataloaders.image_set import DataSplits
from experiment import provenance
from experiment.config import Config

Loader = Callable[[Config], DataSplits]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str, files: provenance.DataFiles | None = None) -> Callable[[Loader], Loader]:
    """Decorator: register a loader under ``name`` (a duplicate name is an error); ``files`` names what it reads."""

    def add(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = fn
        if files is not None:
            provenance.DATA_FILES[name] = files
        return fn

    return add
