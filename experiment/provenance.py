"""What produced a result: method, data (with the file's sha256), protocol, seed, config hash, code version,
library versions and device; written into metrics.json and every row of metrics.csv.

The data set names the files it read (``register_dataset(name, files=...)`` fills ``DATA_FILES``): this layer
imports no data set code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiment.config import Config

ROOT = Path(__file__).resolve().parents[1]  # the repository
LIBRARIES = ("torch", "torchvision", "medmnist", "numpy")
DataFiles = Callable[[Config], list[Path]]
DATA_FILES: dict[str, DataFiles] = {}  # data set name -> the files it reads for a config


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes; "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def process_code(loaded: dict[str, Any]) -> dict[str, Any]:
    """The code a run in this process executes: ``loaded`` (``git_commit()`` when the process imported the engine),
    marked dirty when the checkout has changed since: the modules already imported are ``loaded``'s code, not the
    files on disk (a long-lived process, e.g. ``bench/compare_methods.py``, while commits land)."""
    return loaded if git_commit() == loaded else {**loaded, "dirty": True}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_source(cfg: Config) -> dict[str, Any]:
    """The data set's name and, for the file it names (``DATA_FILES``: ``npz``, MedMNIST's .npz), its path and sha256;
    a data set naming several files gets lists of both."""
    out: dict[str, Any] = {"dataset": cfg.dataset}
    files = DATA_FILES.get(cfg.dataset)
    paths = [p for p in files(cfg) if p.is_file()] if files is not None else []
    if len(paths) == 1:
        out.update(data_path=str(paths[0].resolve()), data_sha256=file_sha256(paths[0]))
    elif paths:
        out.update(data_path=[str(p.resolve()) for p in paths], data_sha256=[file_sha256(p) for p in paths])
    return out


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def collect(cfg: Config, device: torch.device, config_hash: str, code: dict[str, Any]) -> dict[str, Any]:
    """Everything that says what produced a run's numbers; ``code``: the commit the finishing process executes
    (``process_code``), not the checkout's, which may have moved on since the process started."""
    return {
        "method": cfg.method,
        **data_source(cfg),
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "config_hash": config_hash,
        **code,
        "versions": library_versions(),
        "device": describe_device(device),
    }
