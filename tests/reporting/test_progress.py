"""The training progress bar: per-batch advance, and loss terms that fit 80 and 120 columns."""

import io
import logging
import re
import subprocess
import sys

import pytest

from reporting.progress import TaskProgress, epoch_line, postfix_text
from tiny import ROOT, TWO_TASKS

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
    bar = TaskProgress(task=2, epochs=100, first_epoch=4, enabled=True, columns=columns, file=out, interactive=True)
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


def test_bar_without_a_known_length_and_disabled(caplog):
    out = io.StringIO()
    bar = TaskProgress(task=1, epochs=2, first_epoch=0, enabled=False, file=out, interactive=True)
    bar.start_epoch(0, iter(range(3)))  # a generator: no total
    bar.step()
    with caplog.at_level(logging.INFO, logger="reporting.progress"):
        bar.end_epoch({"epoch": 1, "lr": 0.1, "loss": 1.0})
    assert bar.bar.total is None
    bar.close()
    assert out.getvalue() == ""  # no bar drawn at all
    assert re.fullmatch(r"task 1 epoch 1/2: lr=0\.1 loss=1 \(\d+\.\ds\)", caplog.messages[0])


@pytest.mark.parametrize(("enabled", "interactive"), [(True, False), (False, True)])
def test_no_terminal_or_no_progress_draws_nothing_and_logs_one_line_per_epoch(enabled, interactive, caplog):
    out = io.StringIO()
    bar = TaskProgress(task=3, epochs=10, first_epoch=0, enabled=enabled, file=out, interactive=interactive)
    with caplog.at_level(logging.INFO, logger="reporting.progress"):
        for epoch in range(2):
            bar.start_epoch(epoch, list(range(5)))
            for _ in range(5):
                bar.step()
            bar.end_epoch({**RECORD, "epoch": epoch + 1})
    bar.close()
    assert out.getvalue() == "" and len(caplog.messages) == 2
    assert caplog.messages[1].startswith("task 3 epoch 2/10: lr=0.1 loss=0.4123 acc=91.25 ce=0.3 kd=0.0123 idc=0.5 (")


def test_epoch_line_by_hand():
    line = epoch_line(2, 100, {"epoch": 7, "lr": 0.01, "ce": 0.25, "loss": 1.5, "monitor_accuracy": 80.0}, 3.25)
    assert line == "task 2 epoch 7/100: lr=0.01 loss=1.5 acc=80 ce=0.25 (3.2s)"


@pytest.mark.e2e
def test_a_run_whose_output_is_not_a_terminal_logs_one_line_per_epoch_and_no_bar(tmp_path):
    """main.py with stdout and stderr to pipes (a batch job) and progress on: plain epoch lines, no bar fragments."""
    argv = ["--config", str(ROOT / "configs/digits/finetune.yaml"), *TWO_TASKS, "--epochs=2", "--progress=true"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *argv, f"--output_dir={tmp_path / 'run'}", "--threads=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    epochs = re.findall(r"task (\d) epoch (\d)/2: lr=\S+ loss=\S+ .*\(\d+\.\ds\)$", log, re.MULTILINE)
    assert epochs == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert "%|" not in log and "it/s" not in log and "\r" not in log
