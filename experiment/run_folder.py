"""The run folder: where a run writes, how it is named, and the guards that keep runs from mixing or losing results.

- Naming: the default ``output_dir`` names the data set, method, protocol, seed and ``{config_hash}``, the run's
  identity (``identity.run_hash``: every key that changes results, the task a per-task run trains and the
  checkpoint it continues from); so every point of a sweep gets its own folder.
- One run at a time: ``RunFolder.lock`` holds the kernel's lock (``flock``) on ``.lock`` while a run writes, with
  a record of the owner (host, pid, process start time) inside for the messages; a second run is refused in one
  line. The kernel releases the lock when its holder dies, so the next run on this host takes it over; a record
  left by a run on another host is refused until ``python main.py unlock FOLDER``. Only the owner removes ``.lock``.
  On network file systems flock may reach only this host (see README "When things go wrong").
- Nothing lost: a run never writes a task checkpoint where one of an earlier run exists, unless
  ``--overwrite=true``, which first moves the old files into ``replaced-<time>/`` inside the folder;
  temporary files of a killed write (``.<name>.<pid>.cilpart``, only this project's) are removed.
- Which tasks a run trains (``plan_run``): all, one (``task``), the rest after a continued checkpoint, or the rest
  of this folder's own run (``--resume=true``), which also finishes a run whose tasks are all saved but whose
  outputs (metrics.json, written last, figures, history) are not; a truncated last checkpoint is moved aside
  into ``replaced-<time>/`` and its task trained again.
Which keys may differ when a run goes on is ``identity``'s rule; ``best:<folder>`` is ``tuning.best``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiment import identity
from experiment.checkpoint import completed_tasks, is_complete_archive, partial_tasks
from experiment.config import Config, ConfigError, Option, expand_path, register_options
from experiment.errors import CheckpointError, UserError
from experiment.files import remove_temporaries

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
    try:
        filled = str(cfg.output_dir).format(**values)
    except (ValueError, KeyError, IndexError, AttributeError, MemoryError) as err:  # load_config refuses most
        raise ConfigError(
            f"key 'output_dir': cannot fill {str(cfg.output_dir)[:80]!r} ({err}); use plain {{key}}"
        ) from None
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
        """Hold the folder's lock while the block runs; refuse in one line when another run holds it.

        The lock is the kernel's (``flock`` on ``.lock``, released when its holder dies, however it dies); the file
        holds a JSON record of the owner (host, pid, process start time) for the messages. Only the owner removes it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._acquire(self.path / self.LOCK)
        try:
            yield
        finally:
            (self.path / self.LOCK).unlink(missing_ok=True)  # still holding it: no other process can hold it now
            os.close(fd)  # releases the flock

    def _acquire(self, lock: Path) -> int:
        """The open, flocked ``.lock`` holding this process's record; a UserError when another run holds it."""
        for _ in range(10):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not _flock(fd):
                    raise UserError(self._in_use_message(_holders_record(fd), lock))
                if os.fstat(fd).st_ino != _inode(lock):  # its owner released and removed it meanwhile: retry
                    os.close(fd)
                    continue
                owner = _read_record(fd)
                if owner.get("host") not in (None, socket.gethostname()):
                    raise UserError(self._other_host_message(owner))
                if owner.get("pid") != os.getpid() and _same_process_alive(owner):  # e.g. no flock on this file system
                    raise UserError(self._in_use_message(owner, lock))
                if owner.get("pid"):
                    log.warning(
                        "taking over the lock of process %s in %s (it is no longer running)", owner["pid"], self.path
                    )
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(own_record()).encode(), 0)
                os.fsync(fd)
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise UserError(f"could not lock {self.path} (other runs keep taking it); try again")

    def _in_use_message(self, owner: dict[str, Any], lock: Path) -> str:
        pid, host = owner.get("pid"), owner.get("host")
        where = f"process {pid} on {host}" if pid else "another process"
        return (
            f"output_dir {self.path} is in use by {where} since {owner.get('started', '?')}; wait for it to end or "
            "choose another --output_dir"
        )

    def _other_host_message(self, owner: dict[str, Any]) -> str:
        return (
            f"output_dir {self.path} was locked by process {owner.get('pid')} on {owner.get('host')} since "
            f"{owner.get('started', '?')}, which this machine cannot check; if that job has ended, run: python main.py "
            f"unlock {self.path}, then rerun (with --resume=true to continue it)"
        )

    def unlock(self) -> str:
        """Release a lock left by a run that ended without removing it (e.g. a job on another node); refuse while
        its owner may still run. Returns the line saying what was released."""
        lock = self.path / self.LOCK
        if not lock.is_file():
            return f"{self.path} is not locked"
        fd = os.open(lock, os.O_RDWR)
        try:
            owner = _read_record(fd)
            if not _flock(fd) or (owner.get("host") == socket.gethostname() and _same_process_alive(owner)):
                raise UserError(self._in_use_message(owner, lock) + "; unlock refuses while that run is alive")
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
        who = f"process {owner.get('pid')} on {owner.get('host')}" if owner.get("pid") else "an unknown process"
        return f"released the lock of {who} (since {owner.get('started', '?')}) in {self.path}"

    def holder(self) -> str | None:
        """Who holds the folder's lock while that run still runs ('process 12 on host'); None when the folder is not
        locked or its owner is gone (read from the owner record, without touching the lock). A lock recorded by
        another host counts as held: this machine cannot tell."""
        try:
            fd = os.open(self.path / self.LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            owner = _read_record(fd)
        finally:
            os.close(fd)
        if not owner.get("pid"):
            return None
        if owner.get("host") == socket.gethostname() and not _same_process_alive(owner):
            return None
        return f"process {owner['pid']} on {owner.get('host')}"

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete this project's temporary files (``.<name>.<pid>.cilpart``) left by a killed write (call while
        holding the lock); the user's own files, ``*.tmp`` included, are left alone."""
        stale = remove_temporaries(self.path)
        if stale:
            log.info("removed %d temporary file(s) of an interrupted write in %s", len(stale), self.path)
        return stale

    def move_aside(self, keep_tasks: list[int], files: list[Path] | None = None) -> Path | None:
        """Move every run file but the checkpoints of ``keep_tasks`` (or only ``files``) into ``replaced-<time>/``;
        returns it."""
        keep = {f"task_{t}.pt" for t in keep_tasks} | {self.LOCK}
        if files is None:
            files = [p for p in self.path.iterdir() if p.name not in keep and not p.name.startswith("replaced-")]
        if not files:
            return None
        target = self.path / time.strftime("replaced-%Y%m%d-%H%M%S")
        target.mkdir(exist_ok=True)
        for p in files:
            shutil.move(str(p), target / p.name)
        return target


def own_record() -> dict[str, Any]:
    """This process as a lock owner: host, pid, start time (to tell a reused pid apart) and a readable time."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _process_start(pid),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _flock(fd: int) -> bool:
    """Take the exclusive flock on ``fd`` without waiting; False when another open file holds it. On a file system
    without locks (some network file systems), warn and rely on the owner record only."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # ENOLCK, EOPNOTSUPP: no kernel lock here
        log.warning("this file system does not lock files (%s): relying on the owner record only", err.strerror)
        owner = _read_record(fd)
        return not (owner.get("host") == socket.gethostname() and _same_process_alive(owner))
    return True


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _holders_record(fd: int, wait_s: float = 1.0) -> dict[str, Any]:
    """The record of the process that holds the lock. It writes it right after taking the lock, so an empty record,
    or the record of a dead process it is replacing, is read again for up to ``wait_s`` seconds (then {}: the
    message says 'another process')."""
    deadline = time.monotonic() + wait_s
    while True:
        owner = _read_record(fd)
        current = owner and (owner.get("host") != socket.gethostname() or _same_process_alive(owner))
        if current or time.monotonic() >= deadline:
            return owner if current else {}
        time.sleep(0.02)


def _read_record(fd: int) -> dict[str, Any]:
    """The owner record in a lock file; {} when it is empty or unreadable (never a reason to block by itself)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _same_process_alive(owner: dict[str, Any]) -> bool:
    """Whether the recorded owner (on this host) still runs: its pid is alive with the recorded start time."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    return owner.get("start") is None or _process_start(pid) in (None, owner["start"])


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
        mine = _drop_truncated(folder, mine)
        if not mine and not [t for t in partial if first <= t <= last]:
            raise ConfigError(
                f"--resume=true: {folder.path} holds nothing to resume for tasks {first}-{last} (no task_<t>.pt or "
                "task_<t>_partial.pt); drop --resume to start the run"
            )
        if mine:
            if mine[-1] == last and outputs_complete(folder.path, last):
                raise ConfigError(f"--resume=true: {folder.path} already completed task {last}; nothing to train")
            # after the last task: no task to train, only the run's outputs (metrics, figures, history) to write
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
        aside = folder.move_aside(keep)
        if aside is not None:
            log.warning("--overwrite=true: moved the earlier run's files to %s", aside)
    return Plan(first, last, parent, resume=False)


def _drop_truncated(folder: RunFolder, tasks: list[int]) -> list[int]:
    """``tasks`` without the last checkpoints that are truncated (not a whole archive: a copy or write cut short),
    which are moved into ``replaced-<time>/`` (kept, not deleted) so that --resume=true trains those tasks again."""
    tasks = list(tasks)
    while tasks and not is_complete_archive(folder.path / f"task_{tasks[-1]}.pt"):
        path = folder.path / f"task_{tasks[-1]}.pt"
        aside = folder.move_aside([], [path])
        log.warning("%s is truncated (not a whole checkpoint): moved it to %s; training task %d again", path, aside,
                    tasks[-1])  # fmt: skip
        tasks.pop()
    return tasks


def outputs_complete(folder: Path, last: int) -> bool:
    """Whether the run's outputs after task ``last`` are all written: metrics.json, written last, covers it."""
    try:
        doc = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("num_tasks") == last
