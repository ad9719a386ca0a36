"""Class-incremental accuracy metrics: one definition used by the trainer, the benchmarks and the plots.

All accuracies are floats in PERCENT. Labels are positions in the class order, so task ``j`` (0-based here,
1-based in the task loop) owns classes ``[sum(sizes[:j]), sum(sizes[:j+1]))``.
``R[i][j]`` is the accuracy on the test images of task ``j``'s classes after training task ``i`` (``j <= i``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from experiment.files import write_text
from experiment.identity import identity_values

__all__ = ["RunMetrics", "TaskEvaluation", "evaluate_predictions", "format_results_table"]


@dataclass
class TaskEvaluation:
    """Accuracies after one task on all classes seen so far (percent; None where there is nothing to measure)."""

    accuracy: float  # all seen classes, sample-weighted
    balanced_accuracy: float  # mean of per-class accuracies over the classes present in the test set
    per_task: list[float | None]  # accuracy on each task's classes: one row of R; None for a task with no samples
    old_accuracy: float | None  # classes of earlier tasks; None on the first task
    new_accuracy: float | None  # classes of the current task
    per_class: list[float | None]  # one per seen class; None for a class with no test samples
    confusion: list[list[int]]  # (n_seen, n_seen) counts, rows = true class, columns = predicted class
    task_sizes: list[int]  # number of classes in each task so far

    @property
    def n_seen(self) -> int:
        return sum(self.task_sizes)


def _percent(correct: Tensor, count: Tensor) -> list[float | None]:
    """100 * correct / count elementwise, None where count is 0."""
    return [None if n == 0 else 100.0 * c / n for c, n in zip(correct.tolist(), count.tolist())]


def evaluate_predictions(pred: Tensor, y: Tensor, task_sizes_so_far: list[int]) -> TaskEvaluation:
    """Score predicted class positions ``pred`` (N,) against labels ``y`` (N,) over all classes seen so far."""
    sizes = [int(s) for s in task_sizes_so_far]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"task_sizes_so_far must be a non-empty list of positive ints, got {task_sizes_so_far}")
    if pred.dim() != 1 or y.dim() != 1 or pred.shape != y.shape:
        raise ValueError(f"pred and y must be 1-D of equal length, got shapes {tuple(pred.shape)}, {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    n = sum(sizes)
    pred, y = pred.detach().long().cpu(), y.detach().long().cpu()
    for name, t in (("y", y), ("pred", pred)):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} holds class {lo if lo < 0 else hi}, outside the {n} classes seen so far")

    confusion = torch.bincount(y * n + pred, minlength=n * n).view(n, n)  # (n, n), rows = true
    correct = confusion.diagonal()  # (n,)
    count = confusion.sum(dim=1)  # (n,)
    per_class = _percent(correct, count)

    bounds = torch.tensor([0, *sizes]).cumsum(0)  # (T+1,) task boundaries in class positions
    task_of_class = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (n,)
    task_correct = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, task_of_class, correct)  # (T,)
    task_count = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, task_of_class, count)  # (T,)
    per_task = _percent(task_correct, task_count)

    n_old = int(bounds[-2])
    old = None
    if len(sizes) > 1:
        old = _percent(correct[:n_old].sum().view(1), count[:n_old].sum().view(1))[0]
    present = [a for a in per_class if a is not None]
    return TaskEvaluation(
        accuracy=100.0 * int(correct.sum()) / y.numel(),
        balanced_accuracy=sum(present) / len(present),
        per_task=per_task,
        old_accuracy=old,
        new_accuracy=per_task[-1],
        per_class=per_class,
        confusion=confusion.tolist(),
        task_sizes=sizes,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class RunMetrics:
    """Accumulates one TaskEvaluation per task (tasks numbered 1, 2, ... in order) and summarises the run."""

    def __init__(self) -> None:
        self.evaluations: list[TaskEvaluation] = []
        self.extras: list[dict[str, Any]] = []  # per task: val accuracy, epoch times, protocol name, ...

    def __len__(self) -> int:
        return len(self.evaluations)

    def add(self, task: int, evaluation: TaskEvaluation, extra: dict[str, Any] | None = None) -> None:
        """Record the evaluation after ``task`` (1-based); tasks must come in order 1, 2, 3, ..."""
        if task != len(self.evaluations) + 1:
            raise ValueError(f"expected the evaluation of task {len(self.evaluations) + 1}, got task {task}")
        if len(evaluation.per_task) != task:
            raise ValueError(f"the evaluation after task {task} covers {len(evaluation.per_task)} tasks, not {task}")
        self.evaluations.append(evaluation)
        self.extras.append(dict(extra or {}))

    def accuracy_matrix(self) -> list[list[float | None]]:
        """R[i][j] (0-based lists): accuracy on task j's classes after task i; None above the diagonal."""
        t = len(self.evaluations)
        return [list(e.per_task) + [None] * (t - i - 1) for i, e in enumerate(self.evaluations)]

    def forgetting(self) -> float | None:
        """Mean over old tasks j of (best earlier R[l][j], j <= l < T) - R[T][j]; None with a single task."""
        r = self.accuracy_matrix()
        last = len(r) - 1
        drops = []
        for j in range(last):
            past = [r[i][j] for i in range(j, last) if r[i][j] is not None]
            if past and r[last][j] is not None:
                drops.append(max(past) - r[last][j])
        return _mean(drops)

    def backward_transfer(self) -> float | None:
        """Mean over old tasks j of R[T][j] - R[j][j]; None with a single task."""
        r = self.accuracy_matrix()
        last = len(r) - 1
        diffs = [r[last][j] - r[j][j] for j in range(last) if r[last][j] is not None and r[j][j] is not None]
        return _mean(diffs)

    def summary(self) -> dict[str, Any]:
        """Run-level metrics (JSON-ready). Forgetting and backward transfer are None when only one task is done."""
        if not self.evaluations:
            raise ValueError("no task has been evaluated yet")
        acc = [e.accuracy for e in self.evaluations]
        balanced = [e.balanced_accuracy for e in self.evaluations]
        val = [x.get("val_accuracy") for x in self.extras]  # measured by the harness; None without val images
        final = self.evaluations[-1]
        return {
            "num_tasks": len(self.evaluations),
            "task_sizes": list(final.task_sizes),
            "accuracy_matrix": self.accuracy_matrix(),
            "accuracy_per_task": acc,
            "balanced_accuracy_per_task": balanced,
            "old_accuracy_per_task": [e.old_accuracy for e in self.evaluations],
            "new_accuracy_per_task": [e.new_accuracy for e in self.evaluations],
            "average_incremental_accuracy": sum(acc) / len(acc),
            "average_incremental_balanced_accuracy": sum(balanced) / len(balanced),
            "last_accuracy": acc[-1],
            "last_balanced_accuracy": balanced[-1],
            "forgetting": self.forgetting(),
            "backward_transfer": self.backward_transfer(),
            "val_accuracy_per_task": val,
            "last_val_accuracy": val[-1],
            "average_incremental_val_accuracy": None if None in val else sum(val) / len(val),
            "per_class_accuracy": list(final.per_class),
            "confusion_matrix": [list(row) for row in final.confusion],
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints; ``from_dict`` rebuilds an identical RunMetrics."""
        return {
            "tasks": [
                {"task": i + 1, "evaluation": asdict(e), "extra": dict(x)}
                for i, (e, x) in enumerate(zip(self.evaluations, self.extras))
            ]
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunMetrics:
        out = cls()
        for item in state["tasks"]:
            out.add(int(item["task"]), TaskEvaluation(**item["evaluation"]), item["extra"])
        return out

    def write_history(self, output_dir: str | Path, in_progress: list[dict[str, Any]] | None = None) -> Path:
        """history.csv: one row per epoch of every task so far (task, epoch, lr, the mean of each loss term,
        monitor_accuracy), then the epochs done of the task in progress (``in_progress``, after each epoch); a term
        a task does not have is left empty. Rewritten whole through a temporary file: never half-written."""
        rows = [{"task": i + 1, **r} for i, x in enumerate(self.extras) for r in x.get("history", [])]
        rows += [{"task": len(self.extras) + 1, **r} for r in in_progress or []]
        names = {name for row in rows for name in row}
        tail = ["monitor_accuracy"] if "monitor_accuracy" in names else []
        header = [n for n in HISTORY_FIRST if n in names or n in ("task", "epoch")]
        header += sorted(names - set(header) - set(tail)) + tail
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                ["" if row.get(n) is None else f"{row[n]:.6g}" if isinstance(row[n], float) else row[n] for n in header]
            )
        path = Path(output_dir) / "history.csv"
        write_text(path, text.getvalue())
        return path

    def write(
        self, output_dir: str | Path, provenance: dict[str, Any] | None = None, config: dict[str, Any] | None = None
    ) -> tuple[Path, Path]:
        """Write metrics.json (provenance, summary, per-task extras) and metrics.csv (one row per task: the provenance
        columns method, dataset, protocol, seed, config_hash, commit; the result-changing keys of ``config`` that
        differ from the defaults; the task's accuracies; the run's final average incremental / last accuracy and
        forgetting, the same on every row); return both paths."""
        out = Path(output_dir)
        info = dict(provenance or {})
        summary = self.summary()
        doc = {**info, **summary, "tasks": [{"task": i + 1, **x} for i, x in enumerate(self.extras)]}
        json_path = out / "metrics.json"
        write_text(json_path, json.dumps(doc, indent=2, default=_json_default) + "\n")

        r = self.accuracy_matrix()
        keys = {k: v for k, v in changed_keys(config or {}).items() if k not in PROVENANCE_COLUMNS}
        lead = [info.get(k, "") for k in PROVENANCE_COLUMNS] + [_key_cell(v) for v in keys.values()]
        final = ["" if summary[k] is None else f"{summary[k]:.4f}" for k in FINAL_COLUMNS]
        header = [*PROVENANCE_COLUMNS, *keys, "task", "n_seen", "accuracy", "balanced_accuracy", "old_accuracy"]
        header += ["new_accuracy", "val_accuracy", *(f"R_task{j + 1}" for j in range(len(r))), *FINAL_COLUMNS]
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(header)
        for i, e in enumerate(self.evaluations):
            val = self.extras[i].get("val_accuracy")
            values = [e.accuracy, e.balanced_accuracy, e.old_accuracy, e.new_accuracy, val, *r[i]]
            writer.writerow([*lead, i + 1, e.n_seen, *("" if v is None else f"{v:.4f}" for v in values), *final])
        csv_path = out / "metrics.csv"
        write_text(csv_path, text.getvalue())
        return json_path, csv_path


PROVENANCE_COLUMNS = ("method", "dataset", "protocol", "seed", "config_hash", "commit")
FINAL_COLUMNS = ("average_incremental_accuracy", "last_accuracy", "forgetting")  # of the whole run, in metrics.csv


def changed_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The result-changing keys (``identity.identity_values``) of a ``Config.to_dict()`` whose value differs from
    the key's declared default, sorted by name; ``per_task`` when the config has a per-task table."""
    values, defaults = identity_values(config), identity_values({})
    return {k: v for k, v in values.items() if v != defaults[k]}


def _key_cell(value: Any) -> str:
    """A key's value in a CSV cell: lists and tables as compact JSON, None empty."""
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), sort_keys=True) if isinstance(value, list | dict) else str(value)


HISTORY_FIRST = ("task", "epoch", "lr", "loss")  # then the other loss terms (sorted), then monitor_accuracy


def _json_default(value: Any) -> Any:
    """Make tensors, numpy values and paths in per-task extras JSON-serialisable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metrics extra value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:.2f}"
    return str(value)


def format_results_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table for the console.

    Each row holds ``method``, ``dataset``, optionally ``protocol``, and the summary keys
    ``average_incremental_accuracy``, ``last_accuracy``, ``forgetting``, ``accuracy_per_task``. Numbers print
    with two decimals, None as "-", strings as given (e.g. "85.20 ± 1.30" from a multi-seed aggregate).
    """
    if not rows:
        return "(no results)"
    with_protocol = any(r.get("protocol") is not None for r in rows)
    n_tasks = max(len(r.get("accuracy_per_task") or []) for r in rows)
    header = ["method", "dataset", *(["protocol"] if with_protocol else []), "avg_inc_acc", "last_acc", "forgetting"]
    header += [f"T{t + 1}" for t in range(n_tasks)]
    table = [header]
    for r in rows:
        per_task = list(r.get("accuracy_per_task") or [])
        line = [_cell(r.get("method")), _cell(r.get("dataset"))]
        if with_protocol:
            line.append(_cell(r.get("protocol")))
        line += [_cell(r.get(k)) for k in ("average_incremental_accuracy", "last_accuracy", "forgetting")]
        line += [_cell(v) for v in per_task] + ["-"] * (n_tasks - len(per_task))
        table.append(line)
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    n_text = 3 if with_protocol else 2  # left-aligned text columns; numbers are right-aligned

    def fmt(row: list[str]) -> str:
        cells = [cell.ljust(w) if c < n_text else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in table[1:])])
