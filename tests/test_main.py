"""The command line: help in every position, `list`, `--threads`, and a quiet end on a closed stdout."""

import subprocess
import sys

import pytest
import torch

import incremental_train_and_eval as engine
import main
from dataloaders import DATASETS
from experiment import config
from methods import METHODS
from tiny import ROOT


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
        (["best", "-h"], "usage: python main.py best FOLDER [--task=T]"),
        (["sweep", "configs/bloodmnist/sweep_task_1.yaml", "-h"], "usage: python main.py sweep"),
        (["keys", "--help"], "usage: python main.py keys [--method M]"),
        (["list", "-h"], "usage: python main.py list"),
    ],
)
def test_help_in_every_position_prints_instead_of_running(argv, expected, no_work, capsys):
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert expected in out


def test_main_help_names_every_command(capsys):
    assert main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("--config FILE", "demo", "list", "keys", "sweep FILE", "best FOLDER", "COMMAND --help"):
        assert f"python main.py {command}" in out
    assert "--threads N" in out and "PNG and PDF" in out
    assert set(main.COMMANDS) == {"demo", "keys", "list", "sweep", "best"}


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
    for folder in (p for p in (ROOT / "configs").iterdir() if p.is_dir()):
        assert f"\n  {folder.name} " in text
    assert "search/task_1 search/task_2" in text  # the digits search space, listed as sweep files


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
