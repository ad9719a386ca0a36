"""The one writer of run files: temporary names only this project uses, the umask, and a real write failure (a file
size limit in a child process, as a full disk would fail) that torch reports as a RuntimeError."""

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from experiment.checkpoint import load_checkpoint, save_atomic
from experiment.files import is_temporary, remove_temporaries, temp_path, write_text
from tiny import ROOT


def test_temporary_names_carry_the_pid_and_only_ours_are_removed(tmp_path):
    assert temp_path(tmp_path / "task_1.pt") == tmp_path / f".task_1.pt.{os.getpid()}.cilpart"
    ours = [tmp_path / ".task_2.pt.123.cilpart", tmp_path / ".metrics.json.77.cilpart"]
    theirs = [tmp_path / "a.tmp", tmp_path / ".b.tmp", tmp_path / ".c.cilpart", tmp_path / "d.1.cilpart"]
    mine_now = temp_path(tmp_path / "history.csv")  # this process is writing it
    for p in [*ours, *theirs, mine_now]:
        p.write_text("x")
    assert [is_temporary(p) for p in ours + theirs] == [True, True, False, False, False, False]
    assert sorted(remove_temporaries(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in [*theirs, mine_now]) and not any(p.exists() for p in ours)


def test_files_follow_the_umask_checkpoints_included(tmp_path):
    old = os.umask(0o027)
    try:
        save_atomic({"a": torch.ones(2)}, tmp_path / "task_1.pt")
        write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "task_1.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o640
    assert torch.equal(torch.load(tmp_path / "task_1.pt", weights_only=True)["a"], torch.ones(2))


def limit_file_size(size: int):
    """preexec_fn: files of the child may not grow past ``size`` bytes; a bigger write fails with EFBIG (SIGXFSZ,
    which would kill it, ignored). It stops root too, unlike a read-only folder."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


SAVE = """
import sys, torch
from experiment.checkpoint import save_atomic
from experiment.errors import UserError
try:
    save_atomic({"format_version": 2, "a": torch.zeros(100_000)}, sys.argv[1])
except UserError as err:
    print(err)
"""


@pytest.mark.e2e
def test_a_real_failed_checkpoint_write_is_one_line_and_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "task_1.pt"
    save_atomic({"format_version": 2, "a": torch.ones(3)}, target)
    before = target.read_bytes()
    done = subprocess.run(
        [sys.executable, "-c", SAVE, str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size(50_000),
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip() == (
        f"cannot write {target}: file too large (a file size limit of this process or file system); the files "
        "written before it are intact: free space or fix the permissions, then rerun with --resume=true (or choose "
        "another --output_dir)"
    )
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["task_1.pt"]
    assert torch.equal(load_checkpoint(target)["a"], torch.ones(3))
