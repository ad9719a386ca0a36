"""``saved_model_address: best:<folder>``: the task checkpoint of a sweep with the best validation accuracy.

A per-task sweep (``configs/<data>/sweep_task_<t>.yaml``) continues each point of task t from the best task t-1
checkpoint below the previous sweep's folder; ``python main.py best <folder> --task=<t-1>`` prints it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiment.checkpoint import TaskCheckpoint
from experiment.config import Config, ConfigError
from experiment.errors import CheckpointError
from experiment.identity import differences
from experiment.run_folder import RunFolder

log = logging.getLogger(__name__)

BEST_PREFIX = "best:"
TASK_FILE = re.compile(r"task_(\d+)\.pt")


@dataclass(frozen=True)
class Candidate:
    """A task checkpoint found below a sweep folder, with the accuracy it is ranked by."""

    path: Path
    score: float
    mtime: float = 0.0  # when the checkpoint was written: ties go to the newest run


def running_owner(run_dir: Path) -> str | None:
    """Who holds the run folder's lock while that run still runs; None when it is not running."""
    return RunFolder(run_dir).holder()


def task_checkpoints(root: Path, task: int) -> list[Path]:
    """Every ``task_<task>.pt`` below ``root``, sorted, except the copies moved aside by --overwrite
    (``replaced-*`` folders)."""
    found = sorted(root.rglob(f"task_{task}.pt"))
    return [p for p in found if not any(part.startswith("replaced-") for part in p.relative_to(root).parts)]


def best_checkpoint(folder: str | Path, task: int, cfg: Config | None, metric: str = "val") -> Candidate:
    """The ``task_<task>.pt`` below ``folder`` with the highest ``metric`` accuracy (val: validation images of the
    seen classes, measured by the harness after that task; test only for runs of protocol original), among the
    finished runs whose experiment keys agree with ``cfg`` (all runs when None). Runs still going on and files
    that cannot be read are skipped with one line each; ``replaced-*`` copies are never candidates; ties go to
    the newest checkpoint."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"saved_model_address {BEST_PREFIX}{folder}: {root} is not a folder")
    found = task_checkpoints(root, task)
    ranked, other, skipped = [], 0, 0
    for path in found:
        owner = running_owner(path.parent)
        if owner is not None:
            log.warning("best: skipping %s: its run is still going on (%s holds the lock)", path, owner)
            skipped += 1
            continue
        try:
            ckpt = TaskCheckpoint.load(path)
            mtime = path.stat().st_mtime
        except (OSError, CheckpointError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            log.warning("best: skipping %s: cannot be read (%s)", path, reason)
            skipped += 1
            continue
        if cfg is not None and differences(ckpt.config, cfg.to_dict(), ("experiment",)):
            other += 1
            continue
        if metric == "test" and ckpt.config.get("protocol") != "original":
            raise ConfigError(
                f"--metric=test ranks runs by test accuracy, which only protocol original does; {path} is of "
                f"protocol {ckpt.config.get('protocol')}: use --metric=val"
            )
        score = task_score(ckpt.metrics, task, metric)
        if score is not None:
            ranked.append(Candidate(path, score, mtime))
    if not ranked:
        raise ConfigError(
            f"saved_model_address {BEST_PREFIX}{folder}: no usable task_{task}.pt with a {metric} accuracy "
            f"({len(found)} found: {other} of another experiment, {skipped} running or unreadable)"
        )
    best = max(ranked, key=lambda c: (c.score, c.mtime))  # equal scores: the newest run
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


def highest_task(root: Path) -> int | None:
    """The highest task with a checkpoint below ``root`` (``replaced-*`` copies left out); None when there is none."""
    tasks = [
        int(m.group(1))
        for p in root.rglob("task_*.pt")
        if (m := TASK_FILE.fullmatch(p.name)) and not any(x.startswith("replaced-") for x in p.relative_to(root).parts)
    ]
    return max(tasks, default=None)


def main_best(argv: list[str]) -> Path:
    """usage: python main.py best FOLDER [--task=T] [--metric=val|test]

    Prints the task_T.pt below FOLDER with the best validation accuracy after task T (test only for runs of
    protocol original): the checkpoint that saved_model_address: best:FOLDER continues from. Without --task, T
    is the highest task with a checkpoint below FOLDER. Runs still going on (their folder's lock is held) and
    unreadable files are skipped with one line each; replaced-* copies are left out; equal accuracies go to the
    newest run."""
    usage = "usage: python main.py best FOLDER [--task=T] [--metric=val|test]"
    argv = [a if b is None else f"{a}={b}" for a, b in _pairs(argv)]
    folders = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    unknown = set(options) - {"task", "metric"} or [a for a in argv if a.startswith("--") and "=" not in a]
    if len(folders) != 1 or unknown or not options.get("task", "0").isdigit():
        raise ConfigError(usage)
    metric = options.get("metric", "val")
    if metric not in ("val", "test"):
        raise ConfigError(f"--metric must be val or test, got {metric!r}; {usage}")
    root = Path(folders[0]).expanduser()
    if "task" in options:
        task = int(options["task"])
    else:
        if not root.is_dir():
            raise ConfigError(f"best: {root} is not a folder")
        found = highest_task(root)
        if found is None:
            raise ConfigError(f"best: no task_<t>.pt below {root}; run a sweep into it first, or name --task=T")
        task = found
        log.info("best: task %d, the highest with a checkpoint below %s (choose another with --task=T)", task, root)
    return best_checkpoint(folders[0], task, None, metric).path


def _pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """Join ``--task T`` / ``--metric M`` (space form) into pairs; other arguments stay as they are."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--task", "--metric") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((argv[i], argv[i + 1]))
            i += 2
        else:
            out.append((argv[i], None))
            i += 1
    return out
