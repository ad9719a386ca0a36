"""The command line: help in every position, `list`, `--threads`, and a quiet end on a closed stdout."""

import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import incremental_train_and_eval as engine
import main
from dataloaders import DATASETS
from experiment import config, key_reference
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


@pytest.mark.e2e
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
        (["unlock", "-h"], "usage: python main.py unlock FOLDER"),
        (["compare", "runs", "--help"], "usage: python main.py compare FOLDER... [--by KEY[,KEY]]"),
        (["--seed=0,1", "--help"], "--seed=0,1,2"),
    ],
)
def test_help_in_every_position_prints_instead_of_running(argv, expected, no_work, capsys):
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert expected in out


@pytest.mark.e2e
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
    assert "--threads N" in out and "PNG and PDF" in out and "python main.py unlock FOLDER" in out
    assert set(main.COMMANDS) == {"demo", "keys", "list", "sweep", "best", "unlock", "compare"}


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    assert config.OPTIONS["threads"].default == 0 and "`threads`" in key_reference.reference_table()
    with pytest.raises(config.ConfigError, match="key 'threads': must be >= 0, got -1"):
        main.run_from_args(["--threads=-1"])


@pytest.mark.e2e
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


# ----- every documented command, in a fresh process as a user runs it ----------------------------------------------

TINY_CCSI = ["--nb_cl_fg=8", "--nb_cl=2", "--epochs=1", "--batch_size=64", "--device=cpu", "--progress=false",
             "--nb_generation=1", "--syn_batch_size=8", "--syn_iterations=2", "--syn_warmup=1"]  # fmt: skip
NO_DATA = "(or --download=true)"  # the run got past its configuration to the data set's files


def documented_commands(tmp: str) -> list[tuple[list[str], str, int, str]]:
    """(arguments of main.py, working folder, exit code, text the output holds) for each command of the README and
    of the --help texts, with tiny settings; MedMNIST ones run until they find no data (nothing is downloaded)."""
    blood, digits = "configs/bloodmnist/ccsi.yaml", "configs/digits/ccsi.yaml"
    root = str(ROOT)
    return [
        (["--help"], root, 0, "python main.py sweep FILE"),
        (["list"], root, 0, "search/task_1"),
        (["keys"], root, 0, "[synthesis]"),
        (["keys", "--method", "ccsi", "--group=lucir"], root, 0, "lamda (float, task) = 5.0"),
        (["keys", "--markdown"], root, 0, "| `lr` | float |"),
        (["--config", digits, *TINY_CCSI, "--threads", "1", f"--output_dir={tmp}/digits"], root, 0, "ccsi"),
        (
            ["--config", digits, "--lrr=0.1"],
            root,
            2,
            "error: unknown configuration key 'lrr' in the command line (did you mean 'lr'?)",
        ),
        (["--config", blood, "--seed=1", "--threads", "4", f"--data_root={tmp}", "--download=false"], root, 2, NO_DATA),
        (["--config", blood, "--protocol=original", f"--data_root={tmp}", "--download=false"], root, 2, NO_DATA),
        (
            ["--config", f"{root}/{blood}", "--task=2", "--saved_model_address=runs/x/task_1.pt"],
            tmp,
            2,
            "checkpoint not found: runs/x/task_1.pt",
        ),
        (
            ["--config", f"{root}/{blood}", "--task=2", "--saved_model_address=best:runs/sweeps/t1"],
            tmp,
            2,
            "runs/sweeps/t1 is not a folder",
        ),
        (["sweep", "configs/bloodmnist/sweep_task_1.yaml", "--dry-run"], root, 0, "[1/1] /usr/bin/env"),
        (["sweep", "configs/bloodmnist/sweep_task_1.yaml", "--dry-run", "--epochs=1"], root, 0, "--epochs=1"),
        (
            ["sweep", "configs/bloodmnist/sweep_task_2.yaml", "--count=4", "--sweep-seed=0", "--dry-run"],
            root,
            0,
            "--saved_model_address=best:runs/sweeps/bloodmnist/ccsi/task_1",
        ),
        (["sweep", "configs/digits/search/task_1.yaml", "--dry-run", "--epochs=2"], root, 0, "[4/4]"),
        (
            ["best", "runs/sweeps/bloodmnist/ccsi/task_1"],
            tmp,
            2,
            "error: best: runs/sweeps/bloodmnist/ccsi/task_1 is not a folder",
        ),
        (["swep", "configs/digits/search/task_1.yaml"], root, 2, "did you mean 'sweep'?"),
    ]


@pytest.mark.e2e
def test_documented_commands_in_fresh_processes(tmp_path):
    """Each command starts its own interpreter, so it sees only the keys its own imports declare."""

    def run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "main.py"), *argv]
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)

    commands = documented_commands(str(tmp_path))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: run(c[0], c[1]), commands))
    for (argv, _, code, expected), done in zip(commands, results, strict=True):
        out = done.stdout + done.stderr
        assert done.returncode == code and expected in out and "Traceback" not in out, (argv, out[-1500:])
        if code == 2:
            assert len(done.stderr.strip().splitlines()) >= 1 and done.stderr.strip().splitlines()[-1].startswith(
                ("error:", "sweep:")
            ), argv
    keys_lines = results[2].stdout.splitlines()
    assert max(map(len, keys_lines)) <= 100
    assert results[4].stdout == (ROOT / "docs" / "config.md").read_text()


@pytest.mark.e2e
def test_swep_and_learning_rate_get_a_suggestion(capsys):
    assert main.main(["swep", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown command 'swep': did you mean 'sweep'? commands are "
        f"{', '.join(main.COMMANDS)}; a run is python main.py --config FILE [--key=value ...]"
    )
    assert main.main(["--learning_rate=0.1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown configuration key 'learning_rate' in the command line (did you mean 'lr'?)"
    )


@pytest.mark.e2e
def test_keys_options_are_checked(capsys):
    assert main.main(["keys", "--markdown", "--method=ccsi"]) == 2
    assert capsys.readouterr().err.strip() == "error: --markdown prints every key; leave out --method"
    assert main.main(["keys", "--metod=ccsi"]) == 2
    assert "'keys' does not take '--metod=ccsi'" in capsys.readouterr().err


@pytest.mark.e2e
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


@pytest.mark.e2e
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
