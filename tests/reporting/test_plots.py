"""Figures: PNG + PDF files, no windows; what each figure draws (values, names, titles, colours) is checked on the
matplotlib Figure captured at save time."""

import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.patches import Rectangle
from PIL import Image

from reporting import plots
from reporting.metrics import RunMetrics, evaluate_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLOOD = [  # BloodMNIST's class names as medmnist.INFO["bloodmnist"]["label"] gives them
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _is_pdf(path) -> bool:
    return path.read_bytes()[:5] == b"%PDF-"


@pytest.fixture
def figures(monkeypatch):
    """Every Figure passed to plots._save, in order (the files are still written)."""
    seen = []
    save = plots._save

    def record(fig, path):
        seen.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return seen


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


@pytest.fixture
def summary():
    m = RunMetrics()
    y = torch.arange(6).repeat_interleave(3)  # 3 images per class, 3 tasks x 2 classes
    for t in (1, 2, 3):
        seen = y[y < 2 * t]
        pred = torch.where(seen % 3 == 0, (seen + 1) % (2 * t), seen)  # classes 0 and 3 always wrong
        m.add(t, evaluate_predictions(pred, seen, [2] * t))
    return m.summary()


def test_write_run_plots_writes_png_and_pdf_with_the_run_title(tmp_path, summary, figures):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    title = plots.run_title("bloodmnist", "ccsi", "clean")
    paths = plots.write_run_plots(tmp_path / "run", summary, [f"class {i}" for i in range(6)], title)
    assert plt.get_fignums() == before  # figures are not registered with pyplot, so nothing leaks or shows
    stems = ["accuracy_per_task", "accuracy_matrix", "confusion_matrix"]
    assert [p.name for p in paths] == [f"{s}.{ext}" for s in stems for ext in ("png", "pdf")]
    assert all(_is_png(p) for p in paths[::2]) and all(_is_pdf(p) for p in paths[1::2])
    dpi = Image.open(paths[0]).info["dpi"]
    assert round(dpi[0]) == plots.PNG_DPI >= 150
    assert title == "bloodmnist · ccsi · protocol clean"
    assert [f.get_suptitle() for f in figures] == [title] * 3


def test_short_class_names_wrap_or_shorten_with_a_key():
    labels, key = plots.short_class_names(BLOOD)
    assert labels[3] == "immature\ngranulocytes"  # what precedes '(' wraps into two lines
    assert key == {"immature granulocytes": BLOOD[3]}  # only the shortened name needs the key
    assert labels[:3] == BLOOD[:3] and labels[4:] == BLOOD[4:]
    tissue = ["Collecting Duct, Connecting Tubule", "Leukocytes"]
    assert plots.short_class_names(tissue) == (["Collecting Duct,\nConnecting Tubule", "Leukocytes"], {})
    labels, key = plots.short_class_names(["a very long name without any break in it at all"], width=10)
    assert labels == ["a very\nlong name…"] and key == {
        "a very long name…": "a very long name without any break in it at all"
    }
    assert plots.short_class_names(["x", "x"])[0] == ["x", "x [1]"]  # labels stay unique


def test_confusion_is_row_normalised_with_names_title_and_optional_counts(tmp_path, figures):
    cm = [[3, 1, 0], [0, 4, 0], [0, 0, 0]]  # third class has no test image: its row stays empty
    paths = plots.plot_confusion(tmp_path / "c.png", cm, ["a", "b", "c"], title="ctx", counts=True)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    ax = figures[-1].axes[0]
    assert sorted(_texts(ax)) == ["100.0\n(4)", "25.0\n(1)", "75.0\n(3)"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert "% of each true class" in ax.get_title() and figures[-1].get_suptitle() == "ctx"
    image = ax.images[0].get_array()
    assert image[0].tolist() == [75.0, 25.0, 0.0] and image.mask[2].all()
    assert figures[-1].legends == []  # no shortened names, no key

    plots.plot_confusion(tmp_path / "blood.png", np.diag(np.arange(1, 9)).tolist(), BLOOD)
    fig = figures[-1]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][3] == "immature\ngranulocytes"
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"immature granulocytes: {BLOOD[3]}"]
    assert _texts(fig.axes[0]) == ["100.0"] * 8  # zero cells stay empty
    with pytest.raises(ValueError, match="2 names for a 3-class"):
        plots.plot_confusion(tmp_path / "x.png", cm, ["a", "b"])


def test_accuracy_matrix_annotation_scales_with_the_number_of_tasks(tmp_path, figures):
    def matrix(n):
        return [[80.0 + 0.25 * j if j <= i else None for j in range(n)] for i in range(n)]

    plots.plot_accuracy_matrix(tmp_path / "r8.png", matrix(8), "ctx")
    plots.plot_accuracy_matrix(tmp_path / "r20.png", matrix(20))
    plots.plot_accuracy_matrix(tmp_path / "r40.png", matrix(40))
    small, big, huge = (f.axes[0] for f in figures)
    assert len(small.texts) == 36 and small.texts[0].get_text() == "80.0" and small.texts[0].get_fontsize() == 9
    assert len(big.texts) == 210 and big.texts[1].get_text() == "80" and big.texts[0].get_fontsize() == 7
    assert len(huge.texts) == 0 and len(huge.get_xticks()) == 20  # every second task labelled
    w8, w20 = (Image.open(tmp_path / f"r{n}.png").size[0] for n in (8, 20))
    assert 500 < w8 < w20 < 1800  # a cell of 20x20 is still wider than its text


def test_impression_grid_rows_mean_column_and_size(tmp_path, figures):
    means = torch.rand(3, 1, 28, 28)  # (K, C, H, W)
    images = torch.rand(7, 1, 28, 28)
    labels = torch.tensor([2, 0, 0, 2, 2, 2, 0])  # class 1 has no impression: its row shows only the mean
    paths = plots.plot_impressions(tmp_path / "g.png", images, labels, means, ["a", "b", "c"], per_class=3, title="t")
    assert _is_png(paths[0]) and _is_pdf(paths[1])
    ax = figures[-1].axes[0]
    canvas = ax.images[0].get_array()  # grey: one channel, shown with the grey colour map
    assert canvas.ndim == 2 and ax.images[0].get_cmap().name == "gray"

    def tile(row, col):
        return canvas[2 + row * 30 : 2 + row * 30 + 28, 2 + col * 30 : 2 + col * 30 + 28]

    assert np.allclose(tile(0, 0), means[0, 0]) and np.allclose(tile(1, 0), means[1, 0])
    assert np.allclose(tile(0, 1), images[1, 0]) and np.allclose(tile(0, 2), images[2, 0])
    assert np.allclose(tile(2, 3), images[4, 0])  # third impression of class 2 (index 4); the 4th is left out
    assert np.all(tile(1, 1) == 1.0)  # empty slot: white
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mean", "1", "2", "3"]
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 3  # one frame per mean image
    width, height = Image.open(paths[0]).size
    assert width >= 4 * 80 and height >= 3 * 80  # each 28x28 image drawn at >= 80 px
    rgb = plots.plot_impressions(tmp_path / "rgb.png", torch.rand(2, 3, 8, 8), [0, 1], np.ones((2, 3, 8, 8)))
    assert figures[-1].axes[0].images[0].get_array().shape[-1] == 3 and _is_png(rgb[0])
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        plots.plot_impressions(tmp_path / "x.png", images, labels + 1, means)
    with pytest.raises(ValueError, match="same image shape"):
        plots.plot_impressions(tmp_path / "x.png", torch.rand(7, 3, 28, 28), labels, means)
    plots.plot_impressions(tmp_path / "no_means.png", images, labels, None, per_class=3)  # DeepInversion: no means
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"] and not ax.patches
    assert np.allclose(ax.images[0].get_array()[2:30, 2:30], images[1, 0])  # class 0's first impression, first


def test_method_curves_distinct_styles_and_seed_band(tmp_path, figures):
    names = [f"method{i}" for i in range(14)]
    plots.plot_method_curves(tmp_path / "many.png", {n: [90.0 - i, 80.0 - i] for i, n in enumerate(names)}, "14")
    lines = figures[-1].axes[0].get_lines()
    assert len({ln.get_color() for ln in lines}) == 14 and len({ln.get_marker() for ln in lines}) == 14

    seeds = {"ccsi": [[90.0, 80.0], [70.0, 60.0]], "one": [50.0, None], "ragged": [[90.0, 80.0], [70.0]]}
    paths = plots.plot_method_curves(tmp_path / "seeds.png", seeds, "digits", std={"one": [5.0, 0.0]})
    assert _is_png(paths[0]) and _is_pdf(paths[1])
    ax = figures[-1].axes[0]
    means = [ln.get_ydata().tolist() for ln in ax.get_lines()]
    assert means[0] == [80.0, 70.0] and means[2] == [80.0, 80.0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3
    s = math.sqrt(200.0)  # sample std of (90, 70) and of (80, 60)
    lo, hi = bands[0].get_paths()[0].get_extents().intervaly
    assert (lo, hi) == pytest.approx((70.0 - s, 80.0 + s))
    assert bands[1].get_paths()[0].get_extents().intervaly == pytest.approx((45.0, 55.0))  # given std, task 1 only
    assert bands[2].get_paths()[0].get_extents().intervaly == pytest.approx((80.0 - s, 80.0 + s))  # 1 seed: std 0
    assert "band" in ax.get_title()
    with pytest.raises(ValueError, match="at least one curve"):
        plots.plot_method_curves(tmp_path / "y.png", {}, "empty")
