"""Every file a run writes goes through ``atomic_file``: written to a temporary file in the same folder, flushed to
the disk (fsync), then renamed over its name; a crash or a failed write leaves the earlier file (or none) intact.

- Temporary files are named ``.<name>.<pid>.cilpart``: a pattern only this project uses, so that clean-up
  (``remove_temporaries``) never deletes a file it did not write.
- Files follow the process's umask, like any file the user creates (no private 0600 checkpoints).
- A write that fails for a reason the user can fix (full disk, quota, file too large, read-only, no permission, a
  name too long) ends in one ``OutputError`` line naming the file (``errors.writing``), also when torch.save
  reports the failure as a RuntimeError.
- Test-only fault points: with ``CIL_FAULT_AT=<point>`` in the environment, the process SIGKILLs itself at that
  point (``fault_point``): ``write:<name>`` once the temporary file of ``<name>`` holds its data, before the rename;
  ``wrote:<name>`` just after ``<name>`` is in place. Unset (always, outside tests), it costs one comparison.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from experiment.errors import OutputError, writing

TEMP_SUFFIX = ".cilpart"
_TEMP = re.compile(r"^\..+\.(\d+)\.cilpart$")
_FAULT_AT = os.environ.get("CIL_FAULT_AT")  # test-only: see fault_point


def temp_path(path: str | Path) -> Path:
    """The temporary file ``path`` is written to before the rename: ``.<name>.<pid>.cilpart`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is a temporary file of this project (``.<name>.<pid>.cilpart``)."""
    return _TEMP.match(Path(path).name) is not None


def fault_point(name: str) -> None:
    """Test-only: SIGKILL this process when ``CIL_FAULT_AT`` names this point (see the module docstring)."""
    if _FAULT_AT is not None and name == _FAULT_AT:
        os.kill(os.getpid(), signal.SIGKILL)


class _RecordingFile:
    """A binary file whose failed writes are remembered: torch.save turns them into a RuntimeError."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:  # flush, tell, seek, ... of the real file
        return getattr(self.f, name)


@contextmanager
def atomic_file(path: str | Path, text: bool = False) -> Iterator[IO[Any]]:
    """Open ``path``'s temporary file for writing (binary, or text with ``text=True``); on leaving the block it is
    fsynced and renamed over ``path``. A failed write removes the temporary file, leaves ``path`` as it was and
    raises a one-line OutputError when the user can fix the cause."""
    path = Path(path)
    tmp = temp_path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w" if text else "wb", **({"newline": "", "encoding": "utf-8"} if text else {})) as f:
                target = f if text else _RecordingFile(f)
                try:
                    yield target
                except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError
                    recorded = getattr(target, "error", None)
                    if recorded is not None:
                        raise recorded from None
                    if "inline_container" in str(err):  # torch's archive writer, without a Python-level OSError
                        raise OutputError(
                            f"cannot write {path}: {str(err).splitlines()[0][:100]}; the files written before it are "
                            "intact: free space or fix the permissions, then rerun with --resume=true"
                        ) from None
                    raise
                f.flush()
                fault_point(f"write:{path.name}")
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fault_point(f"wrote:{path.name}")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_file(path, text=True) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete this project's temporary files (``.<name>.<pid>.cilpart``) in ``folder`` whose writer is not this
    process (call while holding the folder's lock); any other file, ``*.tmp`` included, is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = str(os.getpid())
    stale = [p for p in folder.iterdir() if (m := _TEMP.match(p.name)) and m.group(1) != mine and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
