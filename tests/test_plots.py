"""Plots write real PNG files without opening windows."""

import pytest
import torch

import plots
from metrics import RunMetrics, evaluate_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


@pytest.fixture
def summary():
    m = RunMetrics()
    y = torch.arange(6).repeat_interleave(3)  # 3 images per class, 3 tasks x 2 classes
    for t in (1, 2, 3):
        seen = y[y < 2 * t]
        pred = torch.where(seen % 3 == 0, (seen + 1) % (2 * t), seen)  # classes 0 and 3 always wrong
        m.add(t, evaluate_predictions(pred, seen, [2] * t))
    return m.summary()


def test_write_run_plots(tmp_path, summary):
    paths = plots.write_run_plots(tmp_path / "run", summary, [f"class {i}" for i in range(6)])
    assert [p.name for p in paths] == ["accuracy_per_task.png", "accuracy_matrix.png", "confusion_matrix.png"]
    assert all(_is_png(p) for p in paths)


def test_single_plots_and_errors(tmp_path, summary):
    assert _is_png(plots.plot_accuracy_matrix(tmp_path / "r.png", [[90.0, None], [70.0, 80.0]]))
    assert _is_png(plots.plot_confusion(tmp_path / "c.png", [[3, 1], [0, 4]]))  # default names: positions
    big = torch.randint(0, 5, (50, 50)).tolist()  # no per-cell text, no tick names: still a valid image
    assert _is_png(plots.plot_confusion(tmp_path / "big.png", big))
    curves = {"ccsi": [90.0, 80.0, 70.0], "finetune": [90.0, 45.0, None]}
    assert _is_png(plots.plot_method_curves(tmp_path / "sub" / "curves.png", curves, "digits, 3 tasks"))
    with pytest.raises(ValueError, match="2 names for a 6-class"):
        plots.plot_confusion(tmp_path / "x.png", summary["confusion_matrix"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one curve"):
        plots.plot_method_curves(tmp_path / "y.png", {}, "empty")


def test_no_pyplot_figures_left_open(tmp_path, summary):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.write_run_plots(tmp_path, summary)
    assert plt.get_fignums() == before  # figures are not registered with pyplot, so nothing leaks or shows
