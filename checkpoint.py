"""Per-task checkpoints, written atomically (temp file, then rename), and their loading."""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import CheckpointError, writing

FORMAT_VERSION = 1
_TASK_FILE = re.compile(r"^task_(\d+)\.pt$")


def task_checkpoint_path(output_dir: str | Path, task: int) -> Path:
    return Path(output_dir) / f"task_{task}.pt"


def partial_checkpoint_path(output_dir: str | Path, task: int) -> Path:
    """The task in progress, saved every ``save_every_epochs`` epochs and removed once ``task_<t>.pt`` exists."""
    return Path(output_dir) / f"task_{task}_partial.pt"


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    A failed write (full disk, read-only folder) leaves ``path`` as it was and raises a one-line OutputError.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_atomic``; a clear CheckpointError if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
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
