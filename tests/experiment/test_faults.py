"""Real faults, not mocked exceptions: a child ``main.py`` SIGKILLed at each phase of a run and then resumed (the
result equals the uninterrupted run's), a truncated checkpoint, a file size limit while a checkpoint is written,
and two processes racing for one run folder's lock.

Kill points: ``CIL_FAULT_AT`` (experiment/files.py) for the writes; inside an epoch, a global optimiser step hook
in the child that SIGKILLs it on the second training step of task 2.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_files import limit_file_size

import main
from experiment.checkpoint import TaskCheckpoint, load_checkpoint
from experiment.errors import CheckpointError
from tiny import ROOT, TWO_TASKS, write_digits

ARGS = ["--config", str(ROOT / "configs/digits/ccsi.yaml"), *TWO_TASKS, "--threads=1"]

# The child for a kill inside an epoch: SIGKILL on the second step of an optimiser over the net's parameters (not
# the synthesis optimiser, which optimises one image tensor) once task_1.pt is written: inside task 2's epoch.
KILL_IN_EPOCH = """
import os, signal, sys
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook
import main
done, steps = Path(sys.argv[1]) / "task_1.pt", []
def hook(opt, args, kwargs):
    if done.exists() and len(opt.param_groups[0]["params"]) > 1:
        steps.append(1)
        if len(steps) == 2:
            print("killed inside an epoch of task 2", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(hook)
sys.exit(main.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def run_args(tmp_path_factory) -> list[str]:
    """ARGS on a 300-image digits file (a quarter of digits' training images: the faults, in less time)."""
    data = write_digits(tmp_path_factory.mktemp("data") / "digits.npz", 10, 300)
    return [*ARGS, "--dataset=npz", f"--data_path={data}"]


def child(out: Path, run_args: list[str], fault: str | None = None, preexec=None) -> subprocess.CompletedProcess:
    """``main.py`` on the two-task ccsi run into ``out`` in a child process, killed at ``fault``."""
    env = {k: v for k, v in os.environ.items() if k != "CIL_FAULT_AT"}
    args = [*run_args, f"--output_dir={out}"]
    if fault == "epoch":
        command = [sys.executable, "-c", KILL_IN_EPOCH, str(out), *args]
    else:
        command = [sys.executable, str(ROOT / "main.py"), *args]
        if fault is not None:
            env["CIL_FAULT_AT"] = fault
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def resume(out: Path, run_args: list[str]) -> int:
    return main.main([*run_args, f"--output_dir={out}", "--resume=true"])


def tensors(obj, prefix=""):
    """Every tensor in a checkpoint, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: t for key, value in items for k, t in tensors(value, f"{prefix}/{key}").items()}


def assert_same_result(out: Path, reference: Path) -> None:
    """The last checkpoint's tensors (net, method parts, random states) and the accuracy matrix are the reference's."""
    got, want = (tensors(load_checkpoint(folder / "task_2.pt")) for folder in (out, reference))
    assert sorted(got) == sorted(want) and len(got) > 10
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    matrix = [json.loads((f / "metrics.json").read_text())["accuracy_matrix"] for f in (out, reference)]
    assert matrix[0] == matrix[1]
    assert not list(out.glob(".*.cilpart")) and not (out / ".lock").exists()
    for name in ("history.csv", "accuracy_matrix.png", "accuracy_per_task.pdf", "confusion_matrix.png"):
        assert (out / name).is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_args) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main.main([*run_args, f"--output_dir={out}"]) == 0
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("fault", "left", "absent"),
    [
        ("epoch", ["task_1.pt"], ["task_2.pt"]),  # inside an epoch of task 2: task 2 is trained again
        ("write:task_2.pt", ["task_1.pt", ".task_2.pt.*.cilpart"], ["task_2.pt"]),  # its data written, not renamed
        ("wrote:task_2.pt", ["task_1.pt", "task_2.pt"], ["metrics.json", "accuracy_matrix.png"]),  # last checkpoint
        ("write:accuracy_matrix.png", ["task_2.pt", "accuracy_per_task.png"], ["metrics.json"]),  # the figures
    ],
)
def test_a_run_killed_at_each_phase_resumes_to_the_uninterrupted_result(
    tmp_path, reference, run_args, fault, left, absent
):
    out = tmp_path / "run"
    killed = child(out, run_args, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert fault != "epoch" or "killed inside an epoch of task 2" in killed.stderr
    assert all(list(out.glob(pattern)) for pattern in left) and not any((out / name).exists() for name in absent)
    assert resume(out, run_args) == 0
    assert_same_result(out, reference)


@pytest.mark.e2e
def test_a_truncated_last_checkpoint_is_named_on_load_and_retrained_on_resume(tmp_path, reference, run_args):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = (out / "task_2.pt").read_bytes()
    (out / "task_2.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(CheckpointError) as info:
        TaskCheckpoint.load(out / "task_2.pt")
    assert str(info.value) == (
        f"checkpoint {out / 'task_2.pt'} is corrupt or unreadable (truncated: an interrupted copy or write); copy it "
        "again, or delete it and rerun that task (in its own run folder, --resume=true retrains it)"
    )
    assert resume(out, run_args) == 0
    [aside] = out.glob("replaced-*")
    assert (aside / "task_2.pt").read_bytes() == data[: len(data) // 2]  # kept, not deleted
    assert_same_result(out, reference)


@pytest.mark.e2e
def test_a_file_size_limit_while_a_checkpoint_is_written_is_one_line_and_the_run_resumes(tmp_path, reference, run_args):
    first, second = ((reference / f"task_{t}.pt").stat().st_size for t in (1, 2))
    assert second - first > 2000  # a limit between them lets task_1.pt through and stops task_2.pt
    out = tmp_path / "run"
    done = child(out, run_args, preexec=limit_file_size((first + second) // 2))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / 'task_2.pt'}: file too large (a file size limit of this process or file "
        "system); the files written before it are intact: free space or fix the permissions, then rerun with "
        "--resume=true (or choose another --output_dir)"
    )
    assert "Traceback" not in done.stderr and not (out / "task_2.pt").exists() and not list(out.glob(".*.cilpart"))
    assert load_checkpoint(out / "task_1.pt")["task"] == 1
    assert resume(out, run_args) == 0
    assert_same_result(out, reference)


# ----- the lock, with real processes ----------------------------------------------------------------------------

RACE = """
import json, os, sys, time
from pathlib import Path
from experiment.errors import UserError
from experiment.run_folder import RunFolder
out, go = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    with RunFolder(out).lock():
        time.sleep(2)
        print("won", json.loads((out / ".lock").read_text())["pid"] == os.getpid(), flush=True)
except UserError as err:
    print("lost", err, flush=True)
"""


@pytest.mark.e2e
def test_two_processes_taking_over_a_stale_lock_at_once_one_wins_and_the_loser_leaves_its_lock(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "before"}))
    racers = [
        subprocess.Popen([sys.executable, "-c", RACE, str(out), str(go)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert [r.stdout.readline().strip() for r in racers] == ["ready"] * 3  # all three wait for the start
    go.touch()
    lines = [r.communicate(timeout=120)[0].strip() for r in racers]
    won = [(r.pid, line) for r, line in zip(racers, lines) if line.startswith("won")]
    assert len(won) == 1 and won[0][1] == "won True", lines  # its record was still its own at the end
    for line in lines:
        if line.startswith("lost"):
            assert f"is in use by process {won[0][0]} on " in line, line
    assert not (out / ".lock").exists()  # removed by its owner, once


@pytest.mark.e2e
def test_unlock_releases_a_lock_of_another_host_but_not_one_of_a_live_run_here(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "yesterday"}))
    assert main.main([*ARGS, f"--output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: output_dir {out} was locked by process 4242 on node-17 since yesterday, which this machine cannot "
        f"check; if that job has ended, run: python main.py unlock {out}, then rerun (with --resume=true to continue "
        "it)\n"
    )
    assert main.main(["unlock", str(out)]) == 0 and not (out / ".lock").exists()
    assert capsys.readouterr().out == f"released the lock of process 4242 on node-17 (since yesterday) in {out}\n"

    holder = subprocess.Popen(
        [sys.executable, "-c", RACE, str(out), str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )  # tmp_path exists: it goes at once, and holds the lock for 2 s
    try:
        assert holder.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not (out / ".lock").exists() or not (out / ".lock").read_text():
            assert time.time() < deadline
            time.sleep(0.05)
        assert main.main(["unlock", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid} on " in err and "unlock refuses while that run is alive" in err
        assert len(err.strip().splitlines()) == 1 and (out / ".lock").exists()
    finally:
        assert holder.communicate(timeout=60)[0].strip() == "won True"


def test_an_empty_lock_file_does_not_block_the_folder(tmp_path):
    from experiment.run_folder import RunFolder

    (tmp_path / ".lock").write_text("")  # e.g. a disk that filled up while the record was written
    with RunFolder(tmp_path).lock():
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
