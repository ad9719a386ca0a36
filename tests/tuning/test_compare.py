"""`compare` over run folders written as a real run writes them: grouping over seeds, mean ± std by hand, --by,
the files it writes, and one-line errors."""

import csv
import sys

import pytest
import yaml

from experiment import config
from experiment.errors import ConfigError
from reporting.metrics import RunMetrics, TaskEvaluation
from tiny import ROOT, TWO_TASKS, write_digits
from tuning.compare import compare, find_runs, parse_args, sweep_folders, sweep_table
from tuning.sweep import main as sweep_main


def _evaluation(per_task: list[float], accuracy: float) -> TaskEvaluation:
    sizes = [2] * len(per_task)
    return TaskEvaluation(accuracy, accuracy, per_task, per_task[0] if len(per_task) > 1 else None, per_task[-1], [],
                          [], sizes)  # fmt: skip


def fake_run(folder, first, old, last, val, config_name="config.yaml", **keys):
    """A finished two-task run: accuracy `first` after task 1; after task 2 `old` on task 1's classes and `last`
    on all; val accuracy `val` after task 2. config.yaml / metrics.json / metrics.csv as the engine writes them."""
    cfg = config.load_config(overrides={"dataset": "digits", "method": "finetune", "output_dir": str(folder), **keys})
    cfg.save(folder / config_name)
    m = RunMetrics()
    m.add(1, _evaluation([first], first), {"val_accuracy": val - 5})
    m.add(2, _evaluation([old, 90.0], last), {"val_accuracy": val})
    info = {"method": cfg.method, "dataset": cfg.dataset, "protocol": cfg.protocol, "seed": cfg.seed}
    m.write(folder, info, cfg.to_dict())


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed, (first, last, val) in enumerate([(80, 60, 70), (82, 62, 71), (84, 64, 72)]):
        fake_run(root / f"a{seed}", first, 50.0, last, val, lr=0.1, seed=seed)
    for seed, (last, old) in enumerate([(70, 60), (80, 70)]):
        fake_run(root / "b" / f"seed{seed}", 90, old, last, 75, lr=0.05, seed=seed)
    fake_run(root / "a0" / "replaced-20261206-102845", 99, 99, 99, 99, lr=0.01)  # a moved-aside copy: left out
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.yaml").write_text("lr: 0.3\n")  # no metrics.json: not a finished run
    return root


@pytest.mark.e2e
def test_groups_over_seeds_with_mean_std_and_n_by_hand(sweep, tmp_path):
    text = compare([sweep])
    lines = text.splitlines()
    assert lines[0] == "5 run(s) in 2 group(s) (mean ± std over seeds)"
    assert lines[1].split() == ["lr", "n", "avg_inc_acc", "last_acc", "forgetting", "val_acc"]
    # lr 0.05: avg inc (90+70)/2, (90+80)/2 = 80, 85; last 70, 80; forgetting 30, 20; val 75, 75 (ranked first)
    assert lines[3].split() == ["0.05", "2", "82.50", "±", "3.54", "75.00", "±", "7.07", "25.00", "±", "7.07", "75.00",
                                "±", "0.00"]  # fmt: skip
    # lr 0.1: avg inc 70, 72, 74; last 60, 62, 64; forgetting 30, 32, 34; val 70, 71, 72
    assert lines[4].split() == ["0.1", "3", "72.00", "±", "2.00", "62.00", "±", "2.00", "32.00", "±", "2.00", "71.00",
                                "±", "1.00"]  # fmt: skip
    rows = list(csv.DictReader((sweep / "compare.csv").open()))
    assert [(r["lr"], r["n"], r["seeds"]) for r in rows] == [("0.05", "2", "0;1"), ("0.1", "3", "0;1;2")]
    assert float(rows[0]["average_incremental_accuracy_std"]) == pytest.approx(3.5355, abs=1e-4)
    assert rows[1]["runs"].split(";") == [str((sweep / f"a{s}").resolve()) for s in range(3)]
    md = (sweep / "compare.md").read_text().splitlines()
    assert md[0] == "| lr | n | avg_inc_acc | last_acc | forgetting | val_acc |"
    assert md[2] == "| 0.05 | 2 | 82.50 ± 3.54 | 75.00 ± 7.07 | 25.00 ± 7.07 | 75.00 ± 0.00 |"
    assert (sweep / "compare.png").stat().st_size > 0 and (sweep / "compare.pdf").is_file()


def test_by_a_key_means_over_every_other_difference_and_out_names_the_folder(sweep, tmp_path):
    text = compare([sweep / "a0", sweep / "b"], by=["method"], out=tmp_path / "table")
    assert text.splitlines()[3].split()[:3] == ["finetune", "3", "78.33"]  # runs a0, b/seed0, b/seed1: 70, 80, 85
    assert (tmp_path / "table" / "compare.csv").is_file() and not (sweep / "a0" / "compare.csv").exists()


def test_one_group_per_seed_and_a_per_task_run_read_from_its_config_task_file(sweep):
    fake_run(sweep / "t2", 90, 80, 85, 80, config_name="config_task_2.yaml", lr=0.05, task=2, saved_model_address="x")
    runs = find_runs([sweep])
    assert len(runs) == 6 and {r.values["task"] for r in runs} == {None, 2}
    lines = compare([sweep], by=["seed"]).splitlines()
    assert [ln.split()[:2] for ln in lines[3:6]] == [["0", "3"], ["1", "2"], ["2", "1"]]  # 79.17, 78.5, 74
    assert compare([sweep]).splitlines()[1].split()[:2] == ["lr", "task"]  # task 2 alone: its own group


def test_bad_input_is_one_line(sweep, tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        compare([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no finished run"):
        compare([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        compare([sweep], by=["learning_rate"])
    with pytest.raises(ConfigError, match="usage: python main.py compare"):
        parse_args(["--by=lr"])
    with pytest.raises(ConfigError, match="unknown option '--bye'"):
        parse_args(["runs", "--bye=lr"])
    assert parse_args(["a", "--by", "lr,seed", "b", "--out=o"]) == (["a", "b"], ["lr", "seed"], "o")


def test_sweep_folders_are_the_fixed_part_of_each_points_output_dir():
    commands = [
        ["python", "main.py", "--lr=0.1", "--output_dir=runs/sw/task_1/seed{seed}-{config_hash}"],
        ["python", "main.py", "--lr=0.2", "--output_dir=runs/sw/task_1/seed{seed}-{config_hash}"],
        ["python", "main.py", "--output_dir=runs/other/{config_hash}", "--output_dir=runs/last/{seed}"],
        ["python", "main.py", "--output_dir=runs/plain"],
        ["python", "main.py", "--lr=0.3"],
    ]
    assert sweep_folders(commands) == ["runs/sw/task_1", "runs/last/", "runs/plain"]
    assert sweep_table([["python", "main.py"]]).startswith("sweep: the points name no --output_dir")


@pytest.mark.e2e
def test_a_sweep_ends_with_the_table_of_its_points(tmp_path, monkeypatch, capsys):
    """Two real tiny digits points (lr 0.1 and 0.01): the sweep prints one row per point and writes the files."""
    monkeypatch.chdir(ROOT)
    spec = {
        "program": "main.py",
        "method": "grid",
        "command": [sys.executable, "${program}", "--config", "configs/digits/finetune.yaml", "${args}"],
        "parameters": {
            "lr": {"values": [0.1, 0.01]},
            "output_dir": {"value": str(tmp_path / "sweep" / "seed{seed}-{config_hash}")},
            **{a[2:].split("=")[0]: {"value": a.split("=")[1]} for a in TWO_TASKS},
            "threads": {"value": 1},
            "dataset": {"value": "npz"},
            "data_path": {"value": write_digits(tmp_path / "d.npz", 10, 300)},  # 300 training images: fast
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert sweep_main([str(path)]) == 0
    out = capsys.readouterr().out
    table = out.split("mean ± std over seeds)\n", 1)[1].splitlines()
    assert table[0].split()[:2] == ["lr", "n"] and sorted(ln.split()[0] for ln in table[2:4]) == ["0.01", "0.1"]
    assert [ln.split()[1] for ln in table[2:4]] == ["1", "1"]
    assert table[4] == f"(as CSV, Markdown and a figure: python main.py compare {tmp_path / 'sweep'} --out DIR)"
    assert sorted(p.name[:5] for p in (tmp_path / "sweep").iterdir()) == ["seed0", "seed0"]  # the two points alone


def test_without_the_declared_keys_compare_refuses_and_a_sweep_says_how_to_compare(sweep, monkeypatch):
    """Which keys change results is known only once they are declared: no table that lumps every point together."""
    monkeypatch.delitem(config.OPTIONS, "seed")
    with pytest.raises(ConfigError, match="keys are not declared"):
        compare([sweep])
    text = sweep_table([["python", "main.py", f"--output_dir={sweep}/{{config_hash}}"]])
    assert text.startswith("sweep: no table") and text.endswith(f"python main.py compare {sweep}/")
