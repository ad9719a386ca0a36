"""The run folder (``output_dir``): where a run writes its config, checkpoints, metrics and plots.

``resolve_output_dir`` turns the configured value into the folder's path and refuses, before anything is
loaded or written, a value that names no folder, a file, or a place the run cannot write to.
"""

from __future__ import annotations

import os
from pathlib import Path

from config import ConfigError, expand_path


def _first_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (``.`` for a relative path)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def resolve_output_dir(raw: str) -> Path:
    """The run folder named by ``output_dir`` (``~`` and ``$VARIABLE`` expanded); a ConfigError if unusable."""
    if not raw.strip():
        raise ConfigError("key 'output_dir' is empty; name the run folder, e.g. --output_dir=runs/my_run")
    path = expand_path("output_dir", raw)
    try:
        existing = _first_existing(path)
    except PermissionError:  # a parent folder that may not be searched
        raise ConfigError(
            f"key 'output_dir': cannot reach {path} (permission denied); choose another --output_dir"
        ) from None
    if existing == path and not path.is_dir():
        raise ConfigError(f"key 'output_dir': {path} is a file, not a folder; choose another --output_dir")
    if not existing.is_dir():
        raise ConfigError(f"key 'output_dir': {path} lies under the file {existing}; choose another --output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == path else f"its existing parent {existing} is"
        raise ConfigError(
            f"key 'output_dir': cannot write into {path}: {where} not writable; choose another --output_dir "
            "or fix the permissions"
        )
    return path
