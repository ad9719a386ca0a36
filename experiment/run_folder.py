"""The run folder: where a run writes, how it is named, and the guards that keep runs from mixing or losing results.

- Identity: the default ``output_dir`` names the data set, method, protocol, seed and ``{config_hash}``, a short
  hash of every key that changes results (``config.config_hash``), of the task a per-task run trains and of the
  checkpoint it continues from; so every point of a sweep gets its own folder.
- One run at a time: ``RunFolder.lock`` holds ``.lock`` (pid, host, start) while a run writes; a second run is
  refused in one line; a lock left by a killed process on this host is recognised as stale and replaced.
- Nothing lost: a run never writes a task checkpoint where one of an earlier run exists, unless
  ``--overwrite=true``, which first moves the old files into ``replaced-<time>/`` inside the folder;
  temporary files of a killed write are removed.
- ``saved_model_address: best:<folder>`` continues from the task ``t-1`` checkpoint with the best validation
  accuracy among the runs below ``<folder>`` (``best_checkpoint``; ``main.py best <folder> --task t``).
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
from typing import Any

from experiment.config import (
    Config,
    ConfigError,
    Option,
    describe_differences,
    differences,
    expand_path,
    register_options,
)
from experiment.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "runs/{dataset}/{method}/{protocol}/seed{seed}-{config_hash}"
BEST_PREFIX = "best:"

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
    run_hash = config_hash_of(cfg, parent_hash)
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


def config_hash_of(cfg: Config, parent_hash: str | None) -> str:
    """The run's identity: its result-changing keys, the task it trains and the run it continues from."""
    from experiment.config import config_hash

    return config_hash(cfg.to_dict(), task=cfg.task, parent=parent_hash)


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


def check_same_experiment(saved: dict[str, Any], cfg: Config, source: str, resume: bool) -> None:
    """Refuse to continue ``source`` (a checkpoint) with other values of the keys that defined it.

    Resuming a run needs every key that changes results to agree; continuing another run's checkpoint
    (``saved_model_address``) needs the experiment keys to agree, and the console lists the per-task keys that
    differ (the per-task sweeps tune them).
    """
    scopes = ("experiment", "task") if resume else ("experiment",)
    diffs = differences(saved, cfg.to_dict(), scopes)
    if diffs:
        how = (
            "resume with the run's values, or continue its checkpoint into another folder with --task and "
            "--saved_model_address"
            if resume
            else "use the values that trained it"
        )
        raise CheckpointError(
            f"{source} was trained with other values of {describe_differences(diffs, 'there', 'now')}; {how}"
        )
    if not resume:
        tuned = differences(saved, cfg.to_dict(), ("task",))
        if tuned:
            log.info(
                "continuing %s with other per-task values: %s", source, describe_differences(tuned, "there", "now")
            )


# ----- best checkpoint of a sweep ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A task checkpoint found below a sweep folder, with the accuracy it is ranked by."""

    path: Path
    score: float


def best_checkpoint(folder: str | Path, task: int, cfg: Config | None, metric: str = "val") -> Candidate:
    """The ``task_<task>.pt`` below ``folder`` with the highest ``metric`` accuracy (val: validation images of the
    seen classes, measured by the harness after that task; test only for protocol original), among the runs
    whose experiment keys agree with ``cfg`` (all runs when None). Ties go to the first path in sorted order."""
    from experiment.checkpoint import TaskCheckpoint

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"saved_model_address {BEST_PREFIX}{folder}: {root} is not a folder")
    found = sorted(root.rglob(f"task_{task}.pt"))
    ranked, skipped = [], []
    for path in found:
        ckpt = TaskCheckpoint.load(path)
        if cfg is not None and differences(ckpt.config, cfg.to_dict(), ("experiment",)):
            skipped.append(path)
            continue
        score = task_score(ckpt.metrics, task, metric)
        if score is not None:
            ranked.append(Candidate(path, score))
    if not ranked:
        raise ConfigError(
            f"saved_model_address {BEST_PREFIX}{folder}: no task_{task}.pt with a {metric} accuracy of a run with this "
            f"experiment's keys ({len(found)} found, {len(skipped)} of another experiment)"
        )
    best = max(ranked, key=lambda c: c.score)  # max keeps the first of equal scores
    log.info(
        "%s%s -> %s (%s accuracy after task %d: %.2f%%, best of %d runs)",
        BEST_PREFIX, folder, best.path, metric, task, best.score, len(ranked),
    )  # fmt: skip
    return best


def task_score(metrics: dict[str, Any], task: int, metric: str) -> float | None:
    """The ``metric`` accuracy after ``task`` in a checkpoint's metrics (RunMetrics.to_dict)."""
    tasks = metrics.get("tasks", [])
    if len(tasks) < task:
        return None
    item = tasks[task - 1]
    if metric == "test":
        return float(item["evaluation"]["accuracy"])
    value = item["extra"].get("val_accuracy")
    return None if value is None else float(value)


def resolve_saved_model_address(cfg: Config) -> Config:
    """Replace ``best:<folder>`` by the chosen checkpoint's path."""
    address = cfg.saved_model_address
    if address is None or not address.startswith(BEST_PREFIX):
        return cfg
    if cfg.task is None or cfg.task < 2:
        raise ConfigError(f"saved_model_address {address}: best: picks a task t-1 checkpoint for --task=t (t >= 2)")
    metric = "test" if cfg.protocol == "original" else "val"
    best = best_checkpoint(address[len(BEST_PREFIX) :], cfg.task - 1, cfg, metric)
    return cfg.replace(saved_model_address=str(best.path))


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
    from experiment.checkpoint import completed_tasks, partial_tasks

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


def main_best(argv: list[str]) -> Path:
    """usage: python main.py best FOLDER --task=T [--metric=val|test]

    Prints the task_T.pt below FOLDER with the best validation accuracy after task T (test only for runs of
    protocol original): the checkpoint that saved_model_address: best:FOLDER continues from."""
    usage = "usage: python main.py best FOLDER --task=T [--metric=val|test]"
    folders = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    unknown = set(options) - {"task", "metric"} or [a for a in argv if a.startswith("--") and "=" not in a]
    if len(folders) != 1 or unknown or not options.get("task", "").isdigit():
        raise ConfigError(usage)
    metric = options.get("metric", "val")
    if metric not in ("val", "test"):
        raise ConfigError(f"--metric must be val or test, got {metric!r}; {usage}")
    return best_checkpoint(folders[0], int(options["task"]), None, metric).path
