"""The local sweep runner: overrides for every point, every point checked before the first runs, points that
compute the same thing skipped, an interrupted sweep continued, the interpreter of the points, the shipped
search spaces."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import main
from experiment.checkpoint import task_checkpoint_path
from tiny import ROOT, write_digits
from tuning import sweep

SEARCH_FILES = sorted((ROOT / "configs").glob("*/search/*.yaml"))
TWO_TASKS = {"nb_cl_fg": 8, "nb_cl": 2, "epochs": 1, "batch_size": 64, "device": "cpu", "progress": False, "threads": 1}


def write_sweep(path: Path, parameters: dict, command: list | None = None, **extra) -> Path:
    spec = {"program": "main.py", "method": "grid", "parameters": parameters, **extra}
    spec["command"] = command or ["${env}", "${interpreter}", "${program}", "--config",
                                  "configs/digits/finetune.yaml", "${args}"]  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def point_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[")]


@pytest.mark.e2e
def test_overrides_in_both_forms_and_bare_flags_apply_to_every_point(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {"lr": {"values": [0.1, 0.2]}})
    argv = ["sweep", str(path), "--dry-run", "--epochs=1", "--threads", "1", "--count", "2", "--progress"]
    assert main.main(argv) == 0
    lines = point_lines(capsys.readouterr().out)
    assert len(lines) == 2
    for line, lr in zip(lines, ("0.1", "0.2"), strict=True):
        assert line.endswith(f"--lr={lr} --epochs=1 --threads=1 --progress")
        assert f"{sys.executable} main.py --config" in line  # ${interpreter}: the Python running the sweep


@pytest.mark.e2e
def test_a_bad_override_is_refused_in_one_line_before_any_point(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {"lr": {"values": [0.1, 0.2]}})
    assert main.main(["sweep", str(path), "--learning_rate=0.1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "error: unknown configuration key 'learning_rate' in the command line (did you mean 'lr'?)"
    )
    assert point_lines(captured.out) == []
    assert main.main(["sweep", str(path), "--dry-run", "--epochs=-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: key 'epochs': must be >= 0, got -1"


@pytest.mark.e2e
def test_points_that_compute_the_same_run_are_skipped_with_a_line(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {"eval_batch_size": {"values": [100, 200]}, "lr": {"values": [0.1, 0.2]}})
    assert main.main(["sweep", str(path), "--dry-run"]) == 0
    lines = point_lines(capsys.readouterr().out)
    assert len(lines) == 4
    assert (
        lines[2]
        == "[3/4] skipped: the same run as point 1 (every result-changing key equal; differs only in eval_batch_size)"
    )
    assert lines[3].startswith("[4/4] skipped: the same run as point 2")


@pytest.mark.e2e
def test_an_interrupted_sweep_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    params = {k: {"value": v} for k, v in TWO_TASKS.items()}
    params["lr"] = {"values": [0.1, 0.05]}
    params["output_dir"] = {"value": str(tmp_path / "runs" / "seed{seed}-{config_hash}")}
    params["dataset"], params["data_path"] = {"value": "npz"}, {"value": write_digits(tmp_path / "d.npz", 10, 300)}
    path = write_sweep(tmp_path / "s.yaml", params)
    assert main.main(["sweep", str(path), "--count=1"]) == 0  # the first point only
    [stopped] = list((tmp_path / "runs").iterdir())
    (stopped / "metrics.json").unlink()  # as if killed during task 2: task 1 saved, nothing after it
    task_checkpoint_path(stopped, 2).unlink()
    capsys.readouterr()

    assert main.main(["sweep", str(path)]) == 2
    captured = capsys.readouterr()
    assert point_lines(captured.out) == []
    assert captured.err.strip() == (
        f"sweep: point 1 stopped part-way in {stopped}; rerun the sweep with --resume=true to continue it "
        "(finished points are skipped)"
    )

    assert main.main(["sweep", str(path), "--resume"]) == 0  # point 1 resumes, point 2 starts
    lines = point_lines(capsys.readouterr().out)
    assert lines[0].endswith("--resume=true") and not lines[1].endswith("--resume=true")
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all((f / "metrics.json").exists() for f in folders)
    assert json.loads((stopped / "metrics.json").read_text())["accuracy_matrix"][1][0] is not None

    assert main.main(["sweep", str(path), "--resume=true"]) == 0  # run again: nothing left to do
    lines = point_lines(capsys.readouterr().out)
    assert lines == [f"[{i}/2] skipped: {f} is finished" for i, f in enumerate(sorted_by_point(lines, folders), 1)]


def sorted_by_point(lines: list[str], folders: list[Path]) -> list[Path]:
    """The folders in the order the lines name them."""
    return [next(f for f in folders if str(f) in line) for line in lines]


@pytest.mark.e2e
def test_a_named_interpreter_without_the_requirements_is_said_in_one_line(tmp_path, capsys):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'tqdm'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    path = write_sweep(tmp_path / "s.yaml", {"lr": {"values": [0.1]}}, ["${env}", str(fake), "${program}", "${args}"])
    assert main.main(["sweep", str(path), "--epochs=1"]) == 2
    captured = capsys.readouterr()
    assert point_lines(captured.out) == []
    assert captured.err.strip() == (
        f"sweep: the command's interpreter {fake} cannot run the project (ModuleNotFoundError: No module named "
        f"'tqdm'); install the requirements there (pip install -r requirements.txt) or write ${{interpreter}} in "
        f"the command to use this one ({sys.executable})"
    )
    assert sweep.interpreter_problem(sys.executable) is None


@pytest.mark.e2e
@pytest.mark.parametrize("path", SEARCH_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_search_spaces_expand_and_every_point_validates(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    spec = sweep.read_sweep(path)
    assert spec["program"] == "main.py" and spec["command"][:2] == ["${env}", ".venv/bin/python"]
    assert spec["metric"] == {"name": "final/last_val_accuracy", "goal": "maximize"}
    assert main.main(["sweep", str(path), "--dry-run", "--epochs=1"]) == 0  # loads every point's config
    lines = point_lines(capsys.readouterr().out)
    if path.parent.parent.name == "digits":
        task = int(path.stem.split("_")[1])
        assert len(lines) == 4 and all(f"--task={task}" in line for line in lines)
        if task > 1:
            assert all(f"--saved_model_address=best:runs/sweeps/digits/ccsi/task_{task - 1}" in ln for ln in lines)
    else:
        assert spec["method"] == "random" and len(lines) == spec["run_cap"]


@pytest.mark.e2e
def test_the_documented_sweep_command_works_in_a_fresh_process():
    """The README's example: in a fresh process (no test imported the engine), the overrides are known keys."""
    done = subprocess.run(
        [sys.executable, "main.py", "sweep", "configs/bloodmnist/sweep_task_1.yaml", "--dry-run", "--epochs=1",
         "--seed", "1", "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [line] = point_lines(done.stdout)
    assert "--epochs=1" in line and "--seed=1" in line and "--resume" not in line  # resume is the runner's
