"""``saved_model_address: best:<folder>``: the task checkpoint of a sweep with the best validation accuracy.

A per-task sweep (``configs/<data>/sweep_task_<t>.yaml``) continues each point of task t from the best task t-1
checkpoint below the previous sweep's folder; ``python main.py best <folder> --task=<t-1>`` prints it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiment.checkpoint import TaskCheckpoint
from experiment.config import Config, ConfigError
from experiment.identity import differences

log = logging.getLogger(__name__)

BEST_PREFIX = "best:"


@dataclass(frozen=True)
class Candidate:
    """A task checkpoint found below a sweep folder, with the accuracy it is ranked by."""

    path: Path
    score: float


def best_checkpoint(folder: str | Path, task: int, cfg: Config | None, metric: str = "val") -> Candidate:
    """The ``task_<task>.pt`` below ``folder`` with the highest ``metric`` accuracy (val: validation images of the
    seen classes, measured by the harness after that task; test only for protocol original), among the runs
    whose experiment keys agree with ``cfg`` (all runs when None). Ties go to the first path in sorted order."""
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
