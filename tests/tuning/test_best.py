"""``best:`` and ``main.py best``: the best finished run below a folder on val, never a replaced-* copy, a run
still going on or a file that cannot be read; ties to the newest; test accuracy only for protocol original."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import main
from experiment.checkpoint import TaskCheckpoint
from experiment.config import ConfigError
from tiny import ROOT
from tuning import best

TINY = ["--epochs=1", "--batch_size=64", "--nb_cl_fg=4", "--nb_cl=3", "--device=cpu", "--progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TaskCheckpoint:
    """One real task-1 checkpoint of a tiny digits run (finetune, one epoch)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = str(ROOT / "configs/digits/finetune.yaml")
    assert main.main(["--config", config, *TINY, "--task=1", f"--output_dir={out}"]) == 0
    return TaskCheckpoint.load(out / "task_1.pt")


def place(ckpt: TaskCheckpoint, path: Path, val: float, test: float = 50.0, task: int = 1, **config) -> Path:
    """A copy of ``ckpt`` at ``path`` whose metrics say ``val``/``test`` accuracy after ``task``."""
    metrics = json.loads(json.dumps(ckpt.metrics))
    item = metrics["tasks"][0]
    item["extra"]["val_accuracy"], item["evaluation"]["accuracy"] = val, test
    metrics["tasks"] = [item] * task
    saved = TaskCheckpoint(**{**ckpt.__dict__, "metrics": metrics, "config": {**ckpt.config, **config}, "task": task})
    path.parent.mkdir(parents=True, exist_ok=True)
    saved.save(path)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock(folder: Path, pid: int, host: str | None = None) -> None:
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-06 10:00:00"}
    (folder / ".lock").write_text(json.dumps(owner))


@pytest.mark.e2e
def test_replaced_copies_are_never_candidates(trained, tmp_path):
    a = place(trained, tmp_path / "a" / "task_1.pt", val=50.0)
    place(trained, tmp_path / "a" / "replaced-20261206-102845" / "task_1.pt", val=90.0)  # moved aside: same score
    assert best.best_checkpoint(tmp_path, 1, None).path == a


@pytest.mark.e2e
def test_a_run_still_going_on_is_skipped_with_a_line_and_a_stale_lock_is_not(trained, tmp_path, caplog):
    a = place(trained, tmp_path / "a" / "task_1.pt", val=64.4)
    running = place(trained, tmp_path / "b" / "task_1.pt", val=98.9)
    lock(running.parent, os.getpid())  # this test's process: alive
    stale = place(trained, tmp_path / "c" / "task_1.pt", val=70.0)
    lock(stale.parent, dead_pid())
    with caplog.at_level(logging.INFO):
        assert best.best_checkpoint(tmp_path, 1, None).path == stale
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped == [f"best: skipping {running}: its run is still going on (process {os.getpid()} on "
                       f"{socket.gethostname()} holds the lock)"]  # fmt: skip
    assert best.running_owner(a.parent) is None and best.running_owner(stale.parent) is None
    lock(stale.parent, 1, host="another-host")  # another machine: cannot be checked, so it counts as running
    assert best.best_checkpoint(tmp_path, 1, None).path == a


@pytest.mark.e2e
def test_unreadable_files_are_skipped_with_a_line_each(trained, tmp_path, caplog, monkeypatch):
    a = place(trained, tmp_path / "a" / "task_1.pt", val=40.0)
    corrupt = tmp_path / "b" / "task_1.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    denied = place(trained, tmp_path / "c" / "task_1.pt", val=99.0)
    load = TaskCheckpoint.load

    def load_as_a_colleague(path):  # tests run as root, for whom chmod 000 does not stop a read
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return load(path)

    monkeypatch.setattr(TaskCheckpoint, "load", staticmethod(load_as_a_colleague))
    with caplog.at_level(logging.INFO):
        assert best.best_checkpoint(tmp_path, 1, None).path == a
    lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith(f"best: skipping {corrupt}: cannot be read (checkpoint {corrupt} is corrupt")
    assert lines[1] == f"best: skipping {denied}: cannot be read (Permission denied)"


@pytest.mark.e2e
def test_no_usable_run_is_refused_in_one_line(trained, tmp_path, capsys):
    running = place(trained, tmp_path / "b" / "task_1.pt", val=98.9)
    lock(running.parent, os.getpid())
    assert main.main(["best", str(tmp_path), "--task=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: saved_model_address best:{tmp_path}: no usable task_1.pt with a val accuracy "
        "(1 found: 0 of another experiment, 1 running or unreadable)"
    )


@pytest.mark.e2e
def test_equal_scores_go_to_the_newest_run(trained, tmp_path):
    old = place(trained, tmp_path / "a" / "task_1.pt", val=80.0)
    new = place(trained, tmp_path / "b" / "task_1.pt", val=80.0)
    os.utime(old, (2_000_000_000, 2_000_000_000))  # a (first in sorted order) is newer
    os.utime(new, (1_000_000_000, 1_000_000_000))
    assert best.best_checkpoint(tmp_path, 1, None).path == old
    os.utime(new, (2_100_000_000, 2_100_000_000))
    assert best.best_checkpoint(tmp_path, 1, None).path == new


@pytest.mark.e2e
def test_metric_test_only_for_protocol_original(trained, tmp_path, capsys):
    place(trained, tmp_path / "a" / "task_1.pt", val=80.0, test=60.0)  # protocol improved (the default)
    assert main.main(["best", str(tmp_path), "--task=1", "--metric=test"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --metric=test ranks runs by test accuracy, which only protocol original does; "
        f"{tmp_path / 'a' / 'task_1.pt'} is of protocol improved: use --metric=val"
    )
    original = tmp_path / "orig"
    low_val = place(trained, original / "a" / "task_1.pt", val=10.0, test=90.0, protocol="original")
    place(trained, original / "b" / "task_1.pt", val=90.0, test=10.0, protocol="original")
    assert main.main(["best", str(original), "--task", "1", "--metric", "test"]) == 0
    assert capsys.readouterr().out.strip() == str(low_val)


@pytest.mark.e2e
def test_best_without_task_picks_the_highest_task_present(trained, tmp_path, capsys, caplog):
    place(trained, tmp_path / "t1" / "a" / "task_1.pt", val=80.0)
    two = place(trained, tmp_path / "t2" / "a" / "task_2.pt", val=70.0, task=2)
    place(trained, tmp_path / "t2" / "a" / "replaced-1" / "task_3.pt", val=70.0, task=3)  # moved aside: not counted
    with caplog.at_level(logging.INFO):
        assert main.main(["best", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(two)
    assert any("best: task 2, the highest with a checkpoint below" in r.getMessage() for r in caplog.records)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main.main(["best", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: best: no task_<t>.pt below {empty}; run a sweep into it first, or name --task=T"
    )


@pytest.mark.e2e
def test_best_usage_errors_are_one_line(capsys):
    for argv in (["best"], ["best", "a", "b"], ["best", "a", "--task=x"], ["best", "a", "--tsk=1"]):
        assert main.main(argv) == 2
        assert (
            capsys.readouterr().err.strip() == "error: usage: python main.py best FOLDER [--task=T] [--metric=val|test]"
        )
    with pytest.raises(ConfigError, match="--metric must be val or test"):
        best.main_best(["a", "--task=1", "--metric=train"])
