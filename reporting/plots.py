"""Figures of a run (accuracy curve, accuracy matrix, confusion matrix), of CCSI impressions and of benchmarks.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg renderer: no pyplot, no global
backend switch, never a window, safe to call from any process or thread. Every function writes ``<stem>.png``
(``PNG_DPI``) and ``<stem>.pdf`` and returns both paths, PNG first.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from experiment.files import atomic_file

__all__ = [
    "PNG_DPI",
    "plot_accuracy_matrix",
    "plot_accuracy_per_task",
    "plot_confusion",
    "plot_impressions",
    "plot_method_curves",
    "run_title",
    "short_class_names",
    "write_run_plots",
]

PNG_DPI = 150
_TICK_NAMES_MAX = 40  # label the axes with class names up to this many classes
_CONFUSION_ANNOTATE_MAX = 20  # write the percentage in each cell up to this many classes
_MATRIX_ANNOTATE_MAX = 30  # write the accuracy in each cell of R up to this many tasks
_NAME_WIDTH = 18  # characters per line of a class name on an axis
# Method i of a benchmark plot gets colour i and marker i (and a dashed line from the 11th on): 16 distinct pairs.
_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#000000", "#00008b", "#b8860b", "#006400", "#8b0000", "#ff1493",
)  # fmt: skip
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "p", "h", "<", ">", "d", "H", "8", "x")
_MEAN_FRAME = "#d62728"  # frame of the mean-image column of an impression grid


def run_title(dataset: str, method: str, protocol: str) -> str:
    """The context line of a run's figures: data set, method and protocol."""
    return f"{dataset} · {method} · protocol {protocol}"


def _save(fig: Figure, path: str | Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf``, each through ``files.atomic_file`` (a failed write leaves an earlier
    file intact); return both paths, PNG first."""
    png = Path(path).with_suffix(".png")
    out = [png, png.with_suffix(".pdf")]
    for target in out:
        with atomic_file(target) as f:
            fig.savefig(f, format=target.suffix[1:], dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.05)
    return out


def _titles(fig: Figure, ax: Any, context: str, what: str) -> None:
    """Context (data set, method, protocol) as the figure's title, ``what`` as the axes' title."""
    if context:
        fig.suptitle(context, fontsize=11, fontweight="bold")
    ax.set_title(what, fontsize=9.5)


def _colorbar(fig: Figure, ax: Any, image: Any, label: str) -> None:
    """Colour bar as tall as the heat map itself, just right of it."""
    fig.colorbar(image, cax=ax.inset_axes((1.03, 0.0, 0.035, 1.0)), label=label)


def _as_array(values: Sequence[Sequence[Any]]) -> np.ndarray:
    """Nested lists with None -> float array with NaN."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)


def _numpy(values: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def short_class_names(
    names: Sequence[str], width: int = _NAME_WIDTH, max_lines: int = 2
) -> tuple[list[str], dict[str, str]]:
    """Axis labels of at most ``max_lines`` lines of ``width`` characters, and {label: full name} of shortened ones.

    A name that does not fit loses what follows its first '(' or ',', then is cut with '…'.
    """
    labels, key = [], {}
    for i, name in enumerate(map(str, names)):
        lines = textwrap.wrap(name, width) or [name]
        if len(lines) > max_lines:
            lines = textwrap.wrap(re.split(r"[(,]", name)[0].strip(), width) or lines
        if len(lines) > max_lines:
            lines = [*lines[: max_lines - 1], lines[max_lines - 1][: width - 1] + "…"]
        label = "\n".join(lines)
        if label in labels:
            label += f" [{i}]"
        if "".join(lines).replace(" ", "") != name.replace(" ", ""):
            key[label.replace("\n", " ")] = name
        labels.append(label)
    return labels, key


def _name_key(fig: Figure, key: dict[str, str]) -> None:
    """Legend under the figure mapping shortened class names to the full ones."""
    if not key:
        return
    handles = [Line2D([], [], linestyle="none")] * len(key)
    labels = [f"{short}: " + "\n    ".join(textwrap.wrap(full, 90)) for short, full in key.items()]
    fig.legend(
        handles, labels, loc="outside lower left", handlelength=0, handletextpad=0, frameon=False, fontsize=8,
        title="shortened class names", title_fontsize=8, alignment="left",
    )  # fmt: skip


def _task_axis(ax: Any, n: int) -> None:
    ax.set_xlabel("after training task")
    ax.set_xticks(range(1, n + 1))
    ax.set_xlim(0.7, n + 0.3)
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)


def plot_accuracy_per_task(path: str | Path, summary: dict[str, Any], title: str = "") -> list[Path]:
    """All-seen and balanced accuracy after each task (from ``RunMetrics.summary()``)."""
    acc = summary["accuracy_per_task"]
    tasks = list(range(1, len(acc) + 1))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(tasks, acc, marker="o", label="accuracy (all seen classes)")
    balanced = summary["balanced_accuracy_per_task"]
    ax.plot(
        tasks, balanced, marker="s", markersize=8, markerfacecolor="none", linestyle="--", label="balanced accuracy"
    )
    _task_axis(ax, len(tasks))
    ax.set_ylabel("test accuracy (%)")
    what = f"accuracy after each task; average incremental accuracy {summary['average_incremental_accuracy']:.2f}%"
    _titles(fig, ax, title, what)
    ax.legend(loc="lower left")
    return _save(fig, path)


def _matrix_style(n: int) -> tuple[float, float, str]:
    """(inches per cell, font size of the cell values, value format) of an n x n heat map."""
    if n <= 10:
        return 0.6, 9.0 if n <= 8 else 8.0, "{:.1f}"
    cell = max(0.3, 8.0 / n) if n <= _MATRIX_ANNOTATE_MAX else 9.0 / n  # unannotated: about 9 inches in all
    return cell, 8.0 if n <= 14 else 7.0 if n <= 20 else 6.0, "{:.0f}"


def plot_accuracy_matrix(
    path: str | Path, accuracy_matrix: Sequence[Sequence[float | None]], title: str = ""
) -> list[Path]:
    """Heat map of R[i][j] (rows: after task i, columns: task j's classes) with the values written in."""
    r = _as_array(accuracy_matrix)  # (T, T), NaN above the diagonal
    n = r.shape[0]
    cell, fontsize, fmt = _matrix_style(n)
    fig = Figure(figsize=(1.9 + cell * n, 1.6 + cell * n), layout="constrained")
    ax = fig.add_subplot(anchor="N")  # spare height falls below: cropped
    im = ax.imshow(np.ma.masked_invalid(r), vmin=0, vmax=100, cmap="viridis")
    _colorbar(fig, ax, im, "accuracy (%)")
    step = max(1, int(np.ceil(n / 20)))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.tick_params(labelsize=9 if n <= 12 else 7)
    ax.set_xlabel("evaluated on the classes of task")
    ax.set_ylabel("after training task")
    if n <= _MATRIX_ANNOTATE_MAX:
        for i, j in zip(*np.nonzero(~np.isnan(r))):
            color = "w" if r[i, j] < 60 else "k"
            ax.text(j, i, fmt.format(r[i, j]), ha="center", va="center", fontsize=fontsize, color=color)
    _titles(fig, ax, title, "accuracy matrix R (%)")
    return _save(fig, path)


def plot_confusion(
    path: str | Path,
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
    title: str = "",
    counts: bool = False,
) -> list[Path]:
    """Row-normalised confusion matrix (% of each true class; rows: true, columns: predicted).

    ``class_names[k]`` names class-order position ``k`` (the labels the matrix is indexed by), not the raw label.
    ``counts`` also writes the number of images in each cell.
    """
    cm = np.asarray(confusion, dtype=float)  # (n, n)
    n = cm.shape[0]
    if class_names is not None and len(class_names) < n:
        raise ValueError(f"class_names has {len(class_names)} names for a {n}-class confusion matrix")
    totals = cm.sum(axis=1, keepdims=True)  # (n, 1) images per true class
    pct = np.divide(100 * cm, totals, out=np.full_like(cm, np.nan), where=totals > 0)  # (n, n)
    names = [str(c) for c in class_names[:n]] if class_names is not None else [str(c) for c in range(n)]
    labels, key = short_class_names(names, max_lines=2 if n <= 20 else 1)
    cell = min(0.6, 8.0 / n)  # inches per cell: the matrix is at most 8 inches wide
    label_room = 0.1 * max((len(line) for lab in labels for line in lab.split("\n")), default=1)
    width = cell * n + min(label_room, 2.0) + 1.2
    fig = Figure(figsize=(width, cell * n + min(label_room, 2.0) * 0.75 + 1.0 + 0.16 * len(key)), layout="constrained")
    ax = fig.add_subplot(anchor="N")  # spare height falls below: cropped
    im = ax.imshow(np.ma.masked_invalid(pct), vmin=0, vmax=100, cmap="Blues")
    _colorbar(fig, ax, im, "% of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= _TICK_NAMES_MAX:
        size = 9 if n <= 12 else 7
        slant = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if max(map(len, labels)) > 3 else {}
        ax.set_xticks(range(n), labels, fontsize=size, **slant)
        ax.set_yticks(range(n), labels, fontsize=size)
    if n <= _CONFUSION_ANNOTATE_MAX:
        fontsize = 8 if n <= 10 else 6
        for i, j in zip(*np.nonzero(cm)):
            text = f"{pct[i, j]:.1f}" if n <= 10 else f"{pct[i, j]:.0f}"
            if counts:
                text += f"\n({int(cm[i, j])})"
            color = "w" if pct[i, j] > 55 else "k"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize - counts, color=color)
    _titles(fig, ax, title, "confusion matrix after the last task (row-normalised: % of each true class)")
    _name_key(fig, key)
    return _save(fig, path)


_GRID_PAD = 2  # white pixels between the images of an impression grid


def _grid_canvas(x: np.ndarray, y: np.ndarray, means: np.ndarray, per_class: int, lead: int) -> np.ndarray:
    """(rows, columns, C) image: row k holds class k's mean image (when ``lead`` is 1), then its first
    ``per_class`` images (white where it has fewer), each with ``_GRID_PAD`` white pixels around."""
    k, c, h, w = means.shape
    tiles = np.ones((k, lead + per_class, c, h, w), dtype=float)
    if lead:
        tiles[:, 0] = means
    order = np.argsort(y, kind="stable")
    sorted_y = y[order]
    rank = np.arange(len(sorted_y)) - np.searchsorted(sorted_y, sorted_y)  # position within its class
    keep = rank < per_class
    tiles[sorted_y[keep], lead + rank[keep]] = x[order[keep]]
    pad = _GRID_PAD
    tiles = np.pad(np.clip(tiles, 0.0, 1.0), ((0, 0), (0, 0), (0, 0), (pad, 0), (pad, 0)), constant_values=1.0)
    canvas = tiles.transpose(0, 3, 1, 4, 2).reshape(k * (h + pad), (lead + per_class) * (w + pad), c)
    return np.pad(canvas, ((0, pad), (0, pad), (0, 0)), constant_values=1.0)


def _check_impressions(x: np.ndarray, y: np.ndarray, means: np.ndarray, names: Sequence[str] | None) -> None:
    if means.ndim != 4 or x.ndim != 4 or x.shape[1:] != means.shape[1:] or y.shape != (len(x),):
        raise ValueError(
            f"plot_impressions needs images (N, C, H, W), labels (N,) and mean_images (K, C, H, W) of the same "
            f"image shape; got {x.shape}, {y.shape}, {means.shape}"
        )
    k = len(means)
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(
            f"impression labels must be in 0..{k - 1} (one mean image per class); got {y.min()}..{y.max()}"
        )
    if names is not None and len(names) < k:
        raise ValueError(f"class_names has {len(names)} names for {k} classes")


def plot_impressions(
    path: str | Path,
    images: Any,
    labels: Any,
    mean_images: Any | None,
    class_names: Sequence[str] | None = None,
    per_class: int = 8,
    title: str = "",
) -> list[Path]:
    """Grid with one row per class k: its mean image (framed, column "mean"; left out when ``mean_images`` is
    None), then its first ``per_class`` images. ``images`` float (N, C, H, W) in [0, 1] with ``labels`` (N,) in
    0..K-1; ``mean_images`` (K, C, H, W), or None (K: the largest label + 1)."""
    x, y = _numpy(images).astype(float), _numpy(labels).astype(int)
    lead = int(mean_images is not None)
    k = int(y.max(initial=-1)) + 1
    means = _numpy(mean_images).astype(float) if lead else np.ones((k, *x.shape[1:]))
    _check_impressions(x, y, means, class_names)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    k, c, h, w = means.shape
    shown = min(per_class, int(np.bincount(y, minlength=k).max(initial=0)))  # no empty columns at the right
    canvas = _grid_canvas(x, y, means, shown, lead)
    names = [str(n) for n in class_names[:k]] if class_names is not None else [f"class {i}" for i in range(k)]
    row_labels, key = short_class_names(names)
    tile_in = 0.6  # inches per image: a 28x28 image at 150 dpi is about 90 px
    label_in = 0.09 * max(len(line) for lab in row_labels for line in lab.split("\n"))
    size = ((lead + shown) * tile_in + label_in + 0.3, k * tile_in + 0.9 + 0.16 * len(key))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot(anchor="N")  # spare height falls below: cropped
    pixels, cmap = (canvas[..., 0], "gray") if c == 1 else (canvas, None)
    ax.imshow(pixels, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    pad = _GRID_PAD
    centre_x = [pad + col * (w + pad) + (w - 1) / 2 for col in range(lead + shown)]
    ax.set_xticks(centre_x, ["mean"] * lead + [str(i) for i in range(1, 1 + shown)], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([pad + row * (h + pad) + (h - 1) / 2 for row in range(k)], row_labels, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if lead:
        _frame_mean_column(ax, k, h, w)
    what = "class mean image, then synthesised" if lead else "synthesised"
    _titles(fig, ax, title, f"{what} impressions (first {shown} per class)")
    _name_key(fig, key)
    return _save(fig, path)


def _frame_mean_column(ax: Any, k: int, h: int, w: int) -> None:
    """Frame each mean image of an impression grid and colour the column's label."""
    ax.get_xticklabels()[0].set(color=_MEAN_FRAME, fontweight="bold")
    pad = _GRID_PAD
    for row in range(k):  # pixel (i, j) spans i - 0.5 .. i + 0.5: the frame runs half a pixel outside the image
        corner = (pad - 1, pad - 1 + row * (h + pad))
        ax.add_patch(Rectangle(corner, w + 1, h + 1, fill=False, edgecolor=_MEAN_FRAME, linewidth=1.5))


def _mean_and_std(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """One curve -> (curve, None); per-seed curves (ragged: NaN-padded) -> (mean, sample std; 0 for one seed)."""
    if not values or not isinstance(values[0], (list, tuple, np.ndarray)):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=float), None
    length = max(len(s) for s in values)
    a = _as_array([[*s, *([None] * (length - len(s)))] for s in values])  # (seeds, T)
    count = (~np.isnan(a)).sum(axis=0)
    mean = np.divide(np.nansum(a, axis=0), count, out=np.full(length, np.nan), where=count > 0)
    squares = np.nansum((a - mean) ** 2, axis=0)
    std = np.divide(squares, count - 1, out=np.zeros(length), where=count > 1) ** 0.5
    return mean, std


def plot_method_curves(
    path: str | Path,
    curves: Mapping[str, Sequence[Any]],
    title: str,
    std: Mapping[str, Sequence[float]] | None = None,
) -> list[Path]:
    """Accuracy after each task of several methods: a distinct colour and marker each, a mean ± std band.

    ``curves[method]`` is one curve, or a list of per-seed curves (mean and sample std computed here); ``std``
    gives the spread of methods passed as one (mean) curve.
    """
    if not curves:
        raise ValueError("plot_method_curves needs at least one curve")
    if len(curves) > len(_COLORS):
        raise ValueError(f"plot_method_curves draws at most {len(_COLORS)} methods, got {len(curves)}")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    n, banded = 0, False
    for i, (name, values) in enumerate(curves.items()):
        mean, spread = _mean_and_std(values)
        if std is not None and name in std:
            spread = np.array([np.nan if v is None else float(v) for v in std[name]], dtype=float)
        x = np.arange(1, len(mean) + 1)
        style = {"color": _COLORS[i], "marker": _MARKERS[i], "linestyle": "-" if i < 10 else "--"}
        ax.plot(x, mean, label=name, markersize=6, linewidth=1.5, **style)
        if spread is not None and np.nanmax(spread, initial=0.0) > 0:
            ax.fill_between(x, mean - spread, mean + spread, color=_COLORS[i], alpha=0.15, linewidth=0)
            banded = True
        n = max(n, len(mean))
    _task_axis(ax, n)
    ax.set_ylabel("test accuracy on seen classes (%)")
    ax.set_title(title + ("\n(line: mean over seeds; band: ± sample std)" if banded else ""), fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _save(fig, path)


def write_run_plots(
    output_dir: str | Path, summary: dict[str, Any], class_names: Sequence[str] | None = None, title: str = ""
) -> list[Path]:
    """accuracy_per_task, accuracy_matrix and confusion_matrix as .png and .pdf; returns the 6 paths."""
    out = Path(output_dir)
    return [
        *plot_accuracy_per_task(out / "accuracy_per_task.png", summary, title),
        *plot_accuracy_matrix(out / "accuracy_matrix.png", summary["accuracy_matrix"], title),
        *plot_confusion(out / "confusion_matrix.png", summary["confusion_matrix"], class_names, title),
    ]
