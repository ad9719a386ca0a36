"""The command line: help in every position, `list`, `--threads`, and a quiet end on a closed stdout."""

import csv
import json
import subprocess
import sys

import pytest
import torch

import incremental_train_and_eval as engine
import main
from dataloaders import DATASETS
from experiment import config
from methods import METHODS
from tiny import ROOT, TWO_TASKS


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command runs instead of printing its help."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command ran")

    monkeypatch.setattr(main, "run_from_args", refuse)
    monkeypatch.setattr(main, "demo", refuse)
    monkeypatch.setattr(main, "listing", refuse)
    from tuning import sweep

    monkeypatch.setattr(sweep, "main", refuse)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "python main.py sweep FILE"),
        (["-h"], "python main.py list"),
        (["--config", "configs/digits/ccsi.yaml", "--help"], "python main.py demo"),
        (["--config=configs/digits/ccsi.yaml", "--seed=1", "-h"], "python main.py keys"),
        (["demo", "--help"], "usage: python main.py demo"),
        (["sweep", "--help"], "python main.py sweep FILE [--dry-run] [--count=N]"),
        (["best", "-h"], "usage: python main.py best FOLDER --task=T"),
        (["sweep", "configs/bloodmnist/sweep_task_1.yaml", "-h"], "usage: python main.py sweep"),
        (["keys", "--help"], "usage: python main.py keys"),
        (["list", "-h"], "usage: python main.py list"),
        (["compare", "runs", "--help"], "usage: python main.py compare FOLDER... [--by KEY[,KEY]]"),
        (["--seed=0,1", "--help"], "--seed=0,1,2"),
    ],
)
def test_help_in_every_position_prints_instead_of_running(argv, expected, no_work, capsys):
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert expected in out


def test_main_help_names_every_command(capsys):
    assert main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in (
        "--config FILE",
        "demo",
        "list",
        "keys",
        "sweep FILE",
        "best FOLDER",
        "compare FOLDER",
        "COMMAND --help",
    ):
        assert f"python main.py {command}" in out
    assert "--threads N" in out and "PNG and PDF" in out
    assert set(main.COMMANDS) == {"demo", "keys", "list", "sweep", "best", "compare"}


def test_list_prints_methods_data_sets_and_configs(capsys):
    assert main.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, cls in METHODS.items():
        first = cls.__doc__.strip().splitlines()[0]
        assert sum(ln.split()[:1] == [name] and first in ln for ln in lines) == 1, name
    assert (
        "  lwf            Distil the previous model's old-class logits on the new data; no memory of old images."
        in lines
    )
    for name in DATASETS:
        assert any(ln.startswith(f"  {name} ") for ln in lines), name
    text = "\n".join(lines)
    assert "\n  bloodmnist    ccsi " in text and "sweep_task_4" in text and "_base" not in text
    for folder in (ROOT / "configs").iterdir():
        assert f"\n  {folder.name} " in text


def test_keys_and_list_take_no_arguments(capsys):
    assert main.main(["list", "extra"]) == 2
    assert capsys.readouterr().err.strip() == "error: 'list' takes no arguments, got: extra"


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_is_applied_before_the_run(monkeypatch, restore_threads):
    seen = []
    monkeypatch.setattr(engine, "run", lambda cfg: seen.append((cfg.threads, torch.get_num_threads())) or {})
    torch.set_num_threads(1)
    main.run_from_args(["--config", str(ROOT / "configs/digits/finetune.yaml"), "--threads", "2"])
    main.run_from_args(["--config", str(ROOT / "configs/digits/finetune.yaml"), "--threads=0"])  # torch's: unchanged
    assert seen == [(2, 2), (0, 2)]
    assert config.OPTIONS["threads"].default == 0 and "`threads`" in config.reference_table()
    with pytest.raises(config.ConfigError, match="key 'threads': must be >= 0, got -1"):
        main.run_from_args(["--threads=-1"])


@pytest.mark.parametrize("command", ["keys", "list", "--help"])
def test_closed_stdout_ends_quietly(command):
    """As `main.py keys | head -1` when head has gone: stdout's reader closed before anything was written."""
    proc = subprocess.Popen(
        [sys.executable, "main.py", command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader goes away at once: every write hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141)
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_seed_list_runs_each_seed_in_its_own_folder_and_ends_with_the_compare_table(tmp_path):
    """--seed=0,1: two real digits runs one after the other, then the table; `compare` reads the same folders."""
    main_py = [sys.executable, str(ROOT / "main.py")]
    argv = ["--config", str(ROOT / "configs/digits/finetune.yaml"), *TWO_TASKS, "--threads=1"]
    out = tmp_path / "seeds"
    proc = subprocess.run(
        [*main_py, *argv, "--seed", "0,1", f"--output_dir={out}/s{{seed}}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads((out / f"s{seed}" / "metrics.json").read_text()) for seed in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1] and runs[0]["accuracy_matrix"] != runs[1]["accuracy_matrix"]
    assert proc.stdout.index("=== seed 0 (1/2) ===") < proc.stdout.index("=== seed 1 (2/2) ===")
    table = proc.stdout.split("mean ± std over seeds)\n", 1)[1].splitlines()
    assert table[0].split() == [
        "dataset",
        "method",
        "protocol",
        "n",
        "avg_inc_acc",
        "last_acc",
        "forgetting",
        "val_acc",
    ]
    mean = sum(r["average_incremental_accuracy"] for r in runs) / 2
    std = abs(runs[0]["average_incremental_accuracy"] - runs[1]["average_incremental_accuracy"]) / 2**0.5
    assert table[2].split()[:7] == ["digits", "finetune", "improved", "2", f"{mean:.2f}", "±", f"{std:.2f}"]
    assert (out / "compare.csv").is_file() and (out / "compare.png").is_file()

    # the same runs through `main.py compare`, one group per seed
    proc = subprocess.run([*main_py, "compare", str(out), "--by", "seed"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert sorted((r["seed"], r["n"]) for r in rows) == [("0", "1"), ("1", "1")]
    for r in rows:
        expected = runs[int(r["seed"])]
        assert float(r["last_accuracy_mean"]) == pytest.approx(expected["last_accuracy"], abs=1e-4)
        assert float(r["forgetting_mean"]) == pytest.approx(expected["forgetting"], abs=1e-4)
        assert r["last_accuracy_std"] == ""


def test_seed_list_refuses_an_output_dir_shared_by_the_seeds(tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs/digits/finetune.yaml"), "--seed=0,1", f"--output_dir={tmp_path}/one"]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --seed=0,1 runs one folder per seed, but output_dir") and "{seed}" in err
    assert main.main(["--config", str(ROOT / "configs/digits/finetune.yaml"), "--seed=0,0"]) == 2
    assert "names a seed twice" in capsys.readouterr().err
    assert main.main(["--config", str(ROOT / "configs/digits/finetune.yaml"), "--seed=0,-1"]) == 2
    assert "key 'seed'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
