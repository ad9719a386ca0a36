"""PNG plots of a run's metrics and of benchmark curves.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg renderer: no pyplot, no global
backend switch, never a window, safe to call from any process or thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from errors import writing

__all__ = [
    "plot_accuracy_matrix",
    "plot_accuracy_per_task",
    "plot_confusion",
    "plot_method_curves",
    "save_impressions_grid",
    "write_run_plots",
]

_ANNOTATE_MAX = 20  # write the value in each cell of a heat map up to this many rows/columns
_TICK_NAMES_MAX = 40  # label the axes with class names up to this many classes


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG through a temporary file: a failed write leaves an earlier ``path`` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _as_array(values: Sequence[Sequence[Any]]) -> np.ndarray:
    """Nested lists with None -> float array with NaN."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)


def _task_axis(ax: Any, n: int) -> None:
    ax.set_xlabel("task")
    ax.set_xticks(range(1, n + 1))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)


def plot_accuracy_per_task(path: str | Path, summary: dict[str, Any]) -> Path:
    """All-seen and balanced accuracy after each task (from ``RunMetrics.summary()``)."""
    acc = summary["accuracy_per_task"]
    tasks = list(range(1, len(acc) + 1))
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot(tasks, acc, marker="o", label="accuracy (all seen)")
    ax.plot(tasks, summary["balanced_accuracy_per_task"], marker="s", linestyle="--", label="balanced accuracy")
    _task_axis(ax, len(tasks))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"avg incremental acc {summary['average_incremental_accuracy']:.2f}%")
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_accuracy_matrix(path: str | Path, accuracy_matrix: Sequence[Sequence[float | None]]) -> Path:
    """Heat map of R[i][j] (rows: after task i, columns: task j's classes) with the values written in."""
    r = _as_array(accuracy_matrix)  # (T, T), NaN above the diagonal
    n = r.shape[0]
    fig = Figure(figsize=(1.2 + 0.6 * n, 1.0 + 0.55 * n))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(r), vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    if n <= _ANNOTATE_MAX:
        for i, j in zip(*np.nonzero(~np.isnan(r))):
            ax.text(j, i, f"{r[i, j]:.1f}", ha="center", va="center", fontsize=8, color="w" if r[i, j] < 60 else "k")
    return _save(fig, path)


def plot_confusion(
    path: str | Path, confusion: Sequence[Sequence[int]], class_names: Sequence[str] | None = None
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), with counts written in for small matrices.

    ``class_names[k]`` names class-order position ``k`` (the labels the matrix is indexed by), not the raw label.
    """
    cm = np.asarray(confusion, dtype=float)  # (n, n)
    n = cm.shape[0]
    if class_names is not None and len(class_names) < n:
        raise ValueError(f"class_names has {len(class_names)} names for a {n}-class confusion matrix")
    size = min(2.5 + 0.45 * n, 14.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, label="count")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= _TICK_NAMES_MAX:
        names = [str(c) for c in class_names[:n]] if class_names is not None else [str(c) for c in range(n)]
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
    if n <= _ANNOTATE_MAX:
        threshold = cm.max() / 2 if cm.size else 0
        for i, j in zip(*np.nonzero(cm)):
            color = "w" if cm[i, j] > threshold else "k"
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7, color=color)
    return _save(fig, path)


def plot_method_curves(path: str | Path, curves: dict[str, Sequence[float | None]], title: str) -> Path:
    """Several methods' accuracy-after-each-task curves on one plot (benchmarks)."""
    if not curves:
        raise ValueError("plot_method_curves needs at least one curve")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    n = 0
    for name, values in curves.items():
        y = [np.nan if v is None else float(v) for v in values]
        ax.plot(range(1, len(y) + 1), y, marker="o", label=name)
        n = max(n, len(y))
    _task_axis(ax, n)
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def write_run_plots(
    output_dir: str | Path, summary: dict[str, Any], class_names: Sequence[str] | None = None
) -> list[Path]:
    """Write accuracy_per_task.png, accuracy_matrix.png and confusion_matrix.png; return their paths."""
    out = Path(output_dir)
    return [
        plot_accuracy_per_task(out / "accuracy_per_task.png", summary),
        plot_accuracy_matrix(out / "accuracy_matrix.png", summary["accuracy_matrix"]),
        plot_confusion(out / "confusion_matrix.png", summary["confusion_matrix"], class_names),
    ]


def save_impressions_grid(
    path: str | Path, images: Any, labels: Any, mean_images: Any | None = None, per_class: int = 8
) -> Path:
    """PNG with one row per class: its mean image (when given), then its first ``per_class`` impressions.

    ``images`` float (N, C, H, W) in [0, 1] with ``labels`` (N,); ``mean_images`` (K, C, H, W) of classes 0..K-1
    fixes the rows to those K classes, otherwise the rows are the classes present in ``labels``.
    """
    import torch
    from torchvision.utils import save_image

    x, y = images.detach().float().cpu(), labels.detach().cpu()
    classes = torch.arange(len(mean_images)) if mean_images is not None else torch.unique(y, sorted=True)
    lead = 1 if mean_images is not None else 0
    cols = lead + per_class
    grid = torch.ones((len(classes), cols, *x.shape[1:]))  # (K, cols, C, H, W), white padding
    if mean_images is not None:
        grid[:, 0] = mean_images.detach().float().cpu()
    known = torch.isin(y, classes)
    y, x = y[known], x[known]
    order = torch.argsort(y, stable=True)
    sorted_y = y[order]
    row = torch.searchsorted(classes, sorted_y)  # class row of each impression
    rank = torch.arange(len(sorted_y)) - torch.searchsorted(sorted_y, sorted_y)  # position within its class
    keep = rank < per_class
    grid[row[keep], lead + rank[keep]] = x[order[keep]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.flatten(0, 1), path, nrow=cols, padding=1, pad_value=1.0)
    return path
