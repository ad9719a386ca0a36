"""Errors meant for the user: main.py prints their one-line message and exits with code 2."""

from __future__ import annotations

import errno
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration problem; its message is one line meant for the user."""


class DataError(UserError):
    """A data set is missing, malformed or inconsistent with the configuration."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or does not match the configuration."""


class TrainingError(UserError):
    """Training cannot continue (e.g. a NaN loss); the message names the task, epoch and term."""


class OutputError(UserError):
    """A file of the run cannot be written (full disk, quota, read-only or forbidden folder)."""


# errno values a user can fix (free space, permissions, another folder), with their one-line description
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file size limit of this process or file system)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_NAME_TOO_LONG = (
    "a file or folder name in it is longer than the file system allows; choose a shorter --output_dir "
    "(the files written before it are intact)"
)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (full disk, quota, file too large, read-only, no permission, a name too long)
    into one OutputError line."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise OutputError(f"cannot write {path}: {_NAME_TOO_LONG}") from None
        if err.errno not in _WRITE_ERRORS:
            raise
        raise OutputError(
            f"cannot write {path}: {_WRITE_ERRORS[err.errno]}; the files written before it are intact: free space "
            "or fix the permissions, then rerun with --resume=true (or choose another --output_dir)"
        ) from None


def what_file_is(head: bytes, expected: str) -> str | None:
    """What a file is, from its first bytes, when it is not a zip archive (.npz files and torch.save checkpoints
    are zip archives); None for a zip archive. ``expected`` names what it should be, e.g. "a .npz archive"."""
    if head.startswith(b"PK"):
        return None
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(b"\x93NUMPY"):
        return f"holds a single array saved with np.save (.npy), not {expected}"
    if head.startswith(b"\x80"):
        return f"is a Python pickle, not {expected}"
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        return f"is a text file (it starts with {head[:24].decode()!r}), not {expected}"
    return f"is not {expected} (it starts with bytes {head[:8].hex(' ')})"


def import_optional(module: str, package: str, needed_by: str, instead: str, error: type[UserError]) -> ModuleType:
    """``module`` of an optional ``package``, imported only where it is used; when it cannot be, one ``error`` line:
    '<needed_by> needs the <package> package, which cannot be imported here (...); install it ..., or <instead>'."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        reason = " ".join(str(err).split())[:200]
        raise error(
            f"{needed_by} needs the {package} package, which cannot be imported here ({reason}); install it with "
            f"`pip install {package}`, or {instead}"
        ) from None
