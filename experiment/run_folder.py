"""The run folder: where a run writes, how it is named, and the guards that keep runs from mixing or losing results.

- Naming: the default ``output_dir`` names the data set, method, protocol, seed and ``{config_hash}``, the run's
  identity (``identity.run_hash``: every key that changes results, the task a per-task run trains and the
  checkpoint it continues from); so every point of a sweep gets its own folder.
- One run at a time: ``RunFolder.lock`` holds ``.lock`` (pid, host, start) while a run writes; a second run is
  refused in one line; a lock left by a killed process on this host is recognised as stale and replaced.
- Nothing lost: a run never writes a task checkpoint where one of an earlier run exists, unless
  ``--overwrite=true``, which first moves the old files into ``replaced-<time>/`` inside the folder;
  temporary files of a killed write are removed.
- Which tasks a run trains (``plan_run``): all, one (``task``), the rest after a continued checkpoint, or the rest
  of this folder's own run (``--resume=true``).
Which keys may differ when a run goes on is ``identity``'s rule; ``best:<folder>`` is ``tuning.best``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from experiment import identity
from experiment.checkpoint import completed_tasks, partial_tasks
from experiment.config import Config, ConfigError, Option, expand_path, register_options
from experiment.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "runs/{dataset}/{method}/{protocol}/seed{seed}-{config_hash}"

register_options(
    "run folder",
    [
        Option(
            "output_dir",
            "str",
            DEFAULT_OUTPUT_DIR,
            "run folder (config, checkpoints, metrics, plots); {key} is replaced by that key's value, {config_hash} "
            "by the run's identity (8 hex digits of the keys that change results, the task and the checkpoint it "
            "continues from), {task} by the task a per-task run trains (all otherwise)",
        ),
        Option(
            "resume",
            "bool",
            False,
            "continue the run in output_dir from its last complete task (or from the task in progress, when "
            "save_every_epochs saved it); every key that changes results must equal the run's",
        ),
        Option(
            "overwrite",
            "bool",
            False,
            "start anew in an output_dir that holds checkpoints of the tasks to train: their files are first moved "
            "into output_dir/replaced-<time>/",
        ),
        Option(
            "task",
            "int",
            None,
            "train only this task (1-based); task > 1 needs saved_model_address",
            min=1,
            nullable=True,
        ),
        Option(
            "saved_model_address",
            "str",
            None,
            "checkpoint (task_<t>.pt) to continue from: trains task t+1 on; best:<folder> = the task_<t>.pt with the "
            "best validation accuracy among the runs below <folder> (t = task - 1; needs task)",
            nullable=True,
        ),
    ],
    scope="run",
)


# ----- the folder's name ---------------------------------------------------------------------------------------


def resolve_output_dir(cfg: Config, parent_hash: str | None) -> tuple[Path, str]:
    """The run folder (placeholders filled, ``~`` and ``$VARIABLE`` expanded) and the run's config hash; a
    ConfigError, before anything is written, when the folder is empty, a file, under a file or not writable."""
    values = cfg.to_dict()
    run_hash = identity.run_hash(cfg, parent_hash)
    values.update(config_hash=run_hash, task="all" if cfg.task is None else cfg.task)
    filled = str(cfg.output_dir).format(**values)
    if not filled.strip():
        raise ConfigError("key 'output_dir' is empty; name the run folder, e.g. --output_dir=runs/my_run")
    path = expand_path("output_dir", filled)
    check_writable_folder(path)
    return path, run_hash


def _first_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (``.`` for a relative path)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: Path) -> None:
    """Refuse a run folder that is a file, lies under a file, or cannot be written into."""
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


# ----- the folder's guards -------------------------------------------------------------------------------------


class RunFolder:
    """A run folder and what the run may do in it."""

    LOCK = ".lock"

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock while the block runs; refuse when another live process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / self.LOCK
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._take_over_if_stale(lock)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            break
        else:
            raise UserError(f"could not lock {self.path} (another run took it at the same time); try again")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _take_over_if_stale(self, lock: Path) -> None:
        """Remove a lock whose process is gone (same host); otherwise refuse in one line."""
        try:
            owner = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            log.warning("removing the stale lock of process %d (no longer running) in %s", pid, self.path)
            lock.unlink(missing_ok=True)
            return
        where = f"process {pid} on {host}" if pid else "another process"
        raise UserError(
            f"output_dir {self.path} is in use by {where} since {owner.get('started', '?')}; wait for it, choose "
            f"another --output_dir, or delete {lock} if no run is using the folder"
        )

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files left by a killed write (call while holding the lock)."""
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()] + [p for p in self.path.glob("*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d temporary file(s) of an interrupted write in %s", len(stale), self.path)
        return stale

    def move_aside(self, keep_tasks: list[int]) -> Path | None:
        """Move every run file but the checkpoints of ``keep_tasks`` into ``replaced-<time>/``; returns it."""
        keep = {f"task_{t}.pt" for t in keep_tasks} | {self.LOCK}
        files = [p for p in self.path.iterdir() if p.name not in keep and not p.name.startswith("replaced-")]
        if not files:
            return None
        target = self.path / time.strftime("replaced-%Y%m%d-%H%M%S")
        target.mkdir()
        for p in files:
            shutil.move(str(p), target / p.name)
        log.warning("--overwrite=true: moved the earlier run's %d file(s) to %s", len(files), target)
        return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----- which tasks a run trains --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Tasks ``first..last`` to train, after loading ``restore`` (the checkpoint continued from) if any."""

    first: int
    last: int
    restore: Path | None
    resume: bool  # restore is this folder's own run (every result key must agree), not another run's


def task_range(cfg: Config, num_tasks: int, parent_task: int | None) -> tuple[int, int]:
    """The tasks the configuration asks for: one task (``task``), the tasks after a continued checkpoint, or all."""
    if cfg.task is not None:
        if cfg.task > num_tasks:
            raise ConfigError(f"key 'task': {cfg.task} is beyond the last task ({num_tasks})")
        if cfg.task > 1 and parent_task is None:
            raise ConfigError(
                f"key 'task': task {cfg.task} needs --saved_model_address=<checkpoint of task {cfg.task - 1}>"
            )
        if cfg.task > 1 and parent_task != cfg.task - 1:
            raise CheckpointError(
                f"{cfg.saved_model_address} is the checkpoint of task {parent_task}, but task {cfg.task} needs that "
                f"of task {cfg.task - 1}"
            )
        return cfg.task, cfg.task
    first = 1 if parent_task is None else parent_task + 1
    if first > num_tasks:
        raise ConfigError(f"{cfg.saved_model_address} completed the last task ({num_tasks}): nothing to train")
    return first, num_tasks


def plan_run(cfg: Config, folder: RunFolder, num_tasks: int, parent_task: int | None, parent: Path | None) -> Plan:
    """What this invocation trains in ``folder``, refusing anything that would mix or replace another run's files.

    ``parent``/``parent_task``: the checkpoint given as ``saved_model_address`` and the task it completed.
    """
    first, last = task_range(cfg, num_tasks, parent_task)
    done, partial = completed_tasks(folder.path), partial_tasks(folder.path)
    mine = [t for t in done if first <= t <= last]
    if cfg.resume:
        if not mine and not [t for t in partial if first <= t <= last]:
            raise ConfigError(
                f"--resume=true: {folder.path} holds nothing to resume for tasks {first}-{last} (no task_<t>.pt or "
                "task_<t>_partial.pt); drop --resume to start the run"
            )
        if mine:
            if mine[-1] == last:
                raise ConfigError(f"--resume=true: {folder.path} already completed task {last}; nothing to train")
            return Plan(mine[-1] + 1, last, folder.path / f"task_{mine[-1]}.pt", resume=True)
        return Plan(first, last, parent, resume=False)
    earlier_elsewhere = [t for t in done if t < first] and (
        parent is None or parent.parent.resolve() != folder.path.resolve()
    )
    conflict = (
        mine
        or [t for t in partial if t >= first]
        or earlier_elsewhere
        or (first == 1 and (folder.path / "metrics.json").exists())
    )
    if conflict and not cfg.overwrite:
        held = f"checkpoints of tasks {done}" if done else "the files of another run"
        raise ConfigError(
            f"output_dir {folder.path} already holds {held}; pass --resume=true to continue that run, "
            "--overwrite=true to move its files aside and start anew, or choose another --output_dir"
        )
    if conflict:
        keep = [t for t in done if t < first] if not earlier_elsewhere else []
        folder.move_aside(keep)
    return Plan(first, last, parent, resume=False)
