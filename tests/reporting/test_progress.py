"""The training progress bar: per-batch advance, and loss terms that fit 80 and 120 columns."""

import io

import pytest

from reporting.progress import TaskProgress, postfix_text

RECORD = {"epoch": 3, "lr": 0.1, "ce": 0.3, "loss": 0.41234, "kd": 0.0123, "monitor_accuracy": 91.25, "idc": 0.5}


def test_postfix_puts_loss_and_accuracy_first_and_stops_at_the_room():
    assert postfix_text(RECORD, 200) == "loss=0.412 acc=91.2 ce=0.3 kd=0.0123 idc=0.5"
    assert postfix_text(RECORD, 22) == "loss=0.412 acc=91.2"  # ", " + 19 characters; "ce=0.3" would not fit
    assert postfix_text(RECORD, 5) == ""


@pytest.mark.parametrize(
    ("columns", "shown"), [(80, "loss=0.412"), (120, "loss=0.412 acc=91.2 ce=0.3 kd=0.0123 idc=0.5")]
)
def test_bar_advances_per_batch_and_fits_the_terminal(columns, shown):
    out = io.StringIO()
    bar = TaskProgress(task=2, epochs=100, first_epoch=4, enabled=True, columns=columns, file=out)
    bar.start_epoch(4, list(range(300)))  # 300 batches per epoch; resumed after 4 epochs
    assert (bar.bar.total, bar.bar.n) == (30000, 1200)
    for _ in range(7):
        bar.step()
    bar.end_epoch(RECORD)
    bar.start_epoch(5, list(range(300)))
    line = str(bar.bar)
    assert bar.bar.n == 1207 and line.startswith("task 2 ep 6/100:   4%")
    assert len(line) <= columns and line.endswith(", " + shown), line
    bar.close()


def test_bar_without_a_known_length_and_disabled():
    bar = TaskProgress(task=1, epochs=2, first_epoch=0, enabled=False)
    bar.start_epoch(0, iter(range(3)))  # a generator: no total
    bar.step()
    bar.end_epoch({"loss": 1.0})
    assert bar.bar.total is None
    bar.close()
