"""Checkpoints: the layout of each kind as a dataclass, written atomically (``files.atomic_file``), and loaded
with one clear error when a file is missing, corrupt, of another kind or format, or lacks an entry.

- ``TaskCheckpoint`` (``task_<t>.pt``): everything a later run needs to continue after task t.
- ``PartialCheckpoint`` (``task_<t>_partial.pt``): the task in progress, saved every ``save_every_epochs``
  epochs and removed once ``task_<t>.pt`` exists.
"""

from __future__ import annotations

import random
import re
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from experiment.errors import CheckpointError, what_file_is
from experiment.files import atomic_file

FORMAT_VERSION = 2
_TASK_FILE = re.compile(r"^task_(\d+)\.pt$")
_PARTIAL_FILE = re.compile(r"^task_(\d+)_partial\.pt$")
_KIND_NAMES = {
    "task": "a completed task's checkpoint (task_<t>.pt)",
    "partial": "a task in progress (task_<t>_partial.pt)",
}
C = TypeVar("C", bound="_Checkpoint")


def task_checkpoint_path(output_dir: str | Path, task: int) -> Path:
    return Path(output_dir) / f"task_{task}.pt"


def partial_checkpoint_path(output_dir: str | Path, task: int) -> Path:
    """The task in progress, saved every ``save_every_epochs`` epochs and removed once ``task_<t>.pt`` exists."""
    return Path(output_dir) / f"task_{task}_partial.pt"


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save through ``files.atomic_file`` (temporary file, fsync, rename over ``path``).

    A failed write (full disk, file size limit, read-only folder) leaves ``path`` as it was and raises a one-line
    OutputError, also when torch reports it as a RuntimeError.
    """
    with atomic_file(path) as f:
        torch.save(obj, f)


def is_complete_archive(path: str | Path) -> bool:
    """Whether ``path`` is a whole zip archive (its central directory, written last, is there): a truncated
    checkpoint is not. Reads the end of the file only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_atomic``; a clear CheckpointError if it is missing or corrupt."""
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as err:  # e.g. a name longer than the file system allows
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}; check the path") from None
    if not found:
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        kind = what_file_is(f.read(64), "a checkpoint written by this framework (a torch.save zip archive)")
    if kind is not None:
        raise CheckpointError(f"checkpoint {path} {kind}; give a task_<t>.pt written by a run")
    if not is_complete_archive(path):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable (truncated: an interrupted copy or write); copy it again, or "
            "delete it and rerun that task (in its own run folder, --resume=true retrains it)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip error means the file is unusable
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({reason}); delete it and rerun that task"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of this framework (format version {FORMAT_VERSION})")
    return state


@dataclass
class _Checkpoint:
    """Fields are the file's entries; ``kind`` and ``format_version`` are added on save and checked on load."""

    KIND: ClassVar[str] = ""

    def save(self, path: str | Path) -> None:
        entries = {f.name: getattr(self, f.name) for f in fields(self)}
        save_atomic({"format_version": FORMAT_VERSION, "kind": self.KIND, **entries}, path)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        state = load_checkpoint(path)
        kind = state.get("kind")
        if kind != cls.KIND:
            raise CheckpointError(
                f"{path} is {_KIND_NAMES.get(kind, f'of kind {kind!r}')}, not {_KIND_NAMES[cls.KIND]}"
                + ("; to continue a task in progress use --resume=true in its output_dir" if kind == "partial" else "")
            )
        missing = [f.name for f in fields(cls) if f.name not in state]
        if missing:
            raise CheckpointError(f"{path} lacks the entries {', '.join(missing)}; it is damaged, rerun that task")
        return cls(**{f.name: state[f.name] for f in fields(cls)})


@dataclass
class TaskCheckpoint(_Checkpoint):
    """State after a completed task: the method (net, head layout, its parts), split, config, RNG and metrics."""

    KIND: ClassVar[str] = "task"
    task: int
    method_name: str
    config: dict[str, Any]
    config_hash: str  # the run's identity (identity.run_hash)
    scenario: dict[str, Any]
    method: dict[str, Any]
    metrics: dict[str, Any]
    rng: dict[str, Any]


@dataclass
class PartialCheckpoint(_Checkpoint):
    """A task in progress after ``epoch`` epochs: what changes during epochs (before_task is re-run on resume)."""

    KIND: ClassVar[str] = "partial"
    task: int
    epoch: int
    config: dict[str, Any]
    net: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None  # fp16 loss scaler (precision.grad_scaler), else None
    selection: dict[str, Any]  # ModelSelector state: best accuracy, state and epoch so far
    history: list[dict[str, float]]
    generator: torch.Tensor  # the task's generator state
    rng: dict[str, Any]


def partial_tasks(output_dir: str | Path) -> list[int]:
    """Task numbers with a ``task_<t>_partial.pt`` (a task in progress) in ``output_dir``, ascending."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = (_PARTIAL_FILE.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def completed_tasks(output_dir: str | Path) -> list[int]:
    """Task numbers with a checkpoint in ``output_dir``, ascending."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = (_TASK_FILE.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def rng_state() -> dict[str, Any]:
    """Random states of Python, NumPy and torch (CPU and CUDA), as plain tensors/lists."""
    state = {
        "python": _encode_python_rng(random.getstate()),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _encode_python_rng(state: tuple) -> list[int]:
    version, internal, gauss = state
    return [version, *internal, -1 if gauss is None else 1]


def set_rng_state(state: dict[str, Any]) -> None:
    values = state["python"]
    random.setstate((values[0], tuple(values[1:-1]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
