"""The console progress bar of one task's training: it advances per batch, says which epoch runs, and shows the
last epoch's loss terms in the room the terminal leaves (the bar itself keeps a fixed width).

    task 2 ep 3/10:  27%|██▋       | 81/300 [00:05<00:13], loss=0.412 acc=91.3 ce=0.3 kd=0.0123

Without a terminal (output redirected to a file, a batch job) or with ``progress: false`` there is no bar: each
epoch logs one plain line instead (``epoch_line``):

    12:29:13 task 2 epoch 3/10: lr=0.1 loss=0.4123 acc=91.25 ce=0.3 kd=0.0123 (2.8s)
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sized
from typing import Any

from tqdm.auto import tqdm

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
SHORT_NAMES = {"monitor_accuracy": "acc"}
FIRST = ("loss", "monitor_accuracy")  # shown first; the other terms follow in their order
MIN_REFRESH_SECONDS = 0.5  # redraw at most twice a second

log = logging.getLogger(__name__)


def _watched() -> bool:
    """Whether a person watches: stdout and stderr (where the bar draws) are both terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def epoch_line(task: int, epochs: int, record: Mapping[str, Any], seconds: float) -> str:
    """One epoch as plain text: task, epoch, lr, the loss terms (loss first), the monitored accuracy, seconds."""
    names = [n for n in ("lr", *FIRST) if n in record] + [n for n in record if n not in ("epoch", "lr", *FIRST)]
    values = " ".join(f"{SHORT_NAMES.get(n, n)}={record[n]:.4g}" for n in names if isinstance(record[n], float | int))
    return f"task {task} epoch {record.get('epoch', '?')}/{epochs}: {values} ({seconds:.1f}s)"


def postfix_text(record: Mapping[str, Any], room: int) -> str:
    """``name=value`` pairs of an epoch's record (loss and the monitored accuracy first; no epoch or lr), as many
    as fit in ``room`` characters (tqdm puts ", " before them)."""
    names = [n for n in FIRST if n in record] + [n for n in record if n not in FIRST and n not in ("epoch", "lr")]
    text = ""
    for name in names:
        value = record[name]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        item = f"{' ' if text else ', '}{SHORT_NAMES.get(name, name)}={shown}"
        if len(text) + len(item) > room:
            break
        text += item
    return text[2:] if text.startswith(", ") else text


def meter_width(desc: str, n: int, total: int | None) -> int:
    """Characters the bar takes without its postfix (elapsed/remaining/rate at their widest usual length)."""
    line = tqdm.format_meter(
        n, total, 3599.0, ncols=None, prefix=desc, bar_format=BAR_FORMAT, unit="batch", rate=0.5, postfix=None
    )
    return len(line)


class TaskProgress:
    """One task's bar: ``start_epoch`` with the epoch's batches, ``step`` per batch, ``end_epoch`` with its record.
    Without a bar (``enabled`` false, or no terminal: ``interactive`` None detects it) each epoch logs one line."""

    def __init__(
        self,
        task: int,
        epochs: int,
        first_epoch: int,
        enabled: bool,
        columns: int | None = None,
        file: Any = None,
        interactive: bool | None = None,
    ):
        self.task, self.epochs, self.first_epoch = task, epochs, first_epoch
        self.columns = columns or shutil.get_terminal_size((120, 24)).columns
        self.record: Mapping[str, Any] = {}
        self.shown = enabled and (_watched() if interactive is None else interactive)
        self.started = time.perf_counter()  # the epoch's start: the end of the previous one
        self.bar = tqdm(
            total=None,
            disable=not self.shown,
            unit="batch",
            leave=False,
            bar_format=BAR_FORMAT,
            ncols=self.columns,
            mininterval=MIN_REFRESH_SECONDS,
            file=file,
        )

    def start_epoch(self, epoch: int, batches: object) -> None:
        """Name the epoch (0-based ``epoch``); the first one sets the total from the number of batches."""
        if self.bar.total is None and isinstance(batches, Sized):
            per_epoch = len(batches)
            self.bar.total = self.epochs * per_epoch
            self.bar.n = self.bar.last_print_n = self.first_epoch * per_epoch
        self.bar.set_description_str(f"task {self.task} ep {epoch + 1}/{self.epochs}", refresh=False)
        self._set_postfix()

    def step(self) -> None:
        self.bar.update(1)

    def end_epoch(self, record: Mapping[str, Any]) -> None:
        """Show the epoch's record beside the bar, or log it as one line when there is no bar."""
        now = time.perf_counter()
        seconds, self.started = now - self.started, now
        self.record = record
        if self.shown:
            self._set_postfix()
        else:
            log.info(epoch_line(self.task, self.epochs, record, seconds))

    def _set_postfix(self) -> None:
        room = self.columns - meter_width(self.bar.desc, self.bar.n, self.bar.total) - 1  # tqdm's last column
        self.bar.set_postfix_str(postfix_text(self.record, max(room, 0)), refresh=False)

    def close(self) -> None:
        self.bar.close()
