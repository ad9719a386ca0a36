"""The benchmark scripts end to end at tiny sizes: outputs written, finished runs skipped, partial ones resumed."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import incremental_train_and_eval as engine
from bench import (
    ablation,
    accuracy,
    ddp_speed,
    gpu_check,
    gpu_check_report,
    make_hard_digits,
    protocol_timing,
    protocols,
    recency_bias,
    speed,
)
from dataloaders.npz_data import read_npz
from experiment import config
from methods.ccsi import CCSI
from runtime import precision
from tiny import ROOT, write_digits


@pytest.fixture(autouse=True)
def one_thread():
    """The scripts run with --threads 1 (fast on a busy 2-core CPU); restore torch's thread count afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_mean_std_is_the_sample_std_and_drops_none():
    assert accuracy.mean_std([1.0, 3.0, None]) == (2.0, pytest.approx(math.sqrt(2.0)))
    assert accuracy.mean_std([5.0]) == (5.0, 0.0)
    assert accuracy.mean_std([None]) is None


@pytest.mark.e2e
def test_accuracy_grid_writes_results_skips_resumes_and_records_failures(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--datasets", "digits", "--methods", "finetune", "--seeds", "0", "--out", str(out), "--runs", str(runs)]
    argv += ["--threads", "1", "--epochs=1", "--nb_cl_fg=8", "--nb_cl=2", "--device=cpu"]  # 2 tasks: 8 + 2 classes
    folder = runs / "digits" / "finetune" / "seed0"
    assert accuracy.main(argv) == 0
    first = json.loads((folder / "metrics.json").read_text())
    md = (out / "results.md").read_text()
    assert "| digits | finetune | improved | 0 |" in md and "`--epochs=1`" in md and "machine: CPU" in md
    assert "bench/accuracy.py --datasets digits" in md and "Failed runs (0)" in md
    [row] = list(csv.DictReader((out / "results.csv").open()))
    assert (row["dataset"], row["method"], row["seeds"]) == ("digits", "finetune", "0")
    assert float(row["last_accuracy_mean"]) == pytest.approx(first["last_accuracy"], abs=1e-4)
    assert float(row["last_accuracy_std"]) == 0.0
    assert [float(v) for v in row["accuracy_per_task_mean"].split(";")] == pytest.approx(
        first["accuracy_per_task"], abs=1e-4
    )  # results.csv holds 4 decimals
    assert (out / "curves_digits.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves_digits.pdf").read_bytes()[:5] == b"%PDF-" and "(curves_digits.pdf)" in md
    capsys.readouterr()

    stamp = (folder / "task_1.pt").stat().st_mtime_ns
    assert accuracy.main(argv) == 0  # finished: skipped, nothing retrained
    assert "1 runs: 0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert (folder / "task_1.pt").stat().st_mtime_ns == stamp

    (folder / "metrics.json").unlink()  # as if stopped after task 1: resumes with task 2 only
    (folder / "task_2.pt").unlink()
    assert accuracy.main(argv) == 0
    assert "1 runs: 1 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert (folder / "task_1.pt").stat().st_mtime_ns == stamp
    assert json.loads((folder / "metrics.json").read_text())["accuracy_matrix"] == first["accuracy_matrix"]

    # another configuration in the same folder is a recorded failure, not a silent reuse
    assert accuracy.main([*argv[:-4], "--epochs=2", *argv[-3:]]) == 1
    assert "FAILED digits/finetune seed 0" in capsys.readouterr().out
    assert "another configuration" in (out / "results.md").read_text()


@pytest.mark.e2e
def test_speed_prints_reference_today_and_fastest_with_ratios(tmp_path, capsys, monkeypatch):
    """CCSI's step and synthesis, three pipelines each, min and median of 3 interleaved repeats: the table's rows,
    ratios that follow from its times, and the summary lines that repeat the fastest and today ratios."""
    monkeypatch.setattr(precision, "BACKEND", "eager")  # --fast_compile true without code generation: fast
    out = tmp_path / "speed.md"
    argv = ["--threads", "1", "--n", "20", "--n_old", "12", "--syn_images", "12", "--batch", "8", "--workers", "0"]
    argv += ["--syn_groups", "2", "--syn_batch", "4", "--syn_iterations", "2", "--device", "cpu"]
    argv += ["--fast_compile", "true", "--out", str(out)]
    assert speed.main(argv) == 0
    text = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()]
    rows = [r for r in rows if r and r[0] in ("training", "synthesis")]
    assert [(r[0], r[1].split(":")[0]) for r in rows] == [
        *(("training", name) for name in ("reference", "today", "fastest")),
        *(("synthesis", name) for name in ("reference", "two-pass", "today", "fastest")),
    ]
    ratios = {}
    for stage in ("training", "synthesis"):
        part = [r for r in rows if r[0] == stage]
        ref = part[0]
        for r in part:
            low, mid = float(r[2]), float(r[3])
            assert 0 < low <= mid and float(r[4]) > 0 and "MiB peak RSS" in r[8]
            for col, ref_t, t in ((6, float(ref[2]), low), (7, float(ref[3]), mid)):
                ratio = float(r[col].rstrip("x"))  # the times are printed to 1 ms, the ratios to 0.01
                assert (ref_t - 5e-4) / (t + 5e-4) - 5e-3 <= ratio <= (ref_t + 5e-4) / (t - 5e-4) + 5e-3, (r, col)
            ratios[stage, r[1].split(":")[0]] = (r[6], r[7])
        assert ratios[stage, "reference"] == ("1.00x", "1.00x")
    assert "compile true" in rows[2][1] and "fp32" in rows[1][1] and "one-pass fused moments" in rows[5][1]
    assert "syn_fused_moments false" in rows[4][1] and "two-pass autograd moments" in rows[3][1]
    assert "TensorDataset" in rows[0][1] and "train_epoch" in rows[1][1] and "3 interleaved repeats" in text
    for stage, target in (("training", 5), ("synthesis", 10)):
        line = re.search(
            rf"{stage} speed-up \(fastest / reference\): (\S+) min, (\S+) median \(target on a GPU: >= {target}x\); "
            r"today / reference (\S+) min, (\S+) median",
            text,
        )
        assert line is not None, stage
        assert (line[1], line[2]) == ratios[stage, "fastest"] and (line[3], line[4]) == ratios[stage, "today"]
    moments = re.search(
        r"synthesis today / two-pass \(before item 4\): (\S+)x min, (\S+)x median \(target on a CPU", text
    )
    two_pass, today = float(rows[4][2]), float(rows[5][2])  # min s of the synthesis rows two-pass and today
    assert (two_pass - 5e-4) / (today + 5e-4) - 5e-3 <= float(moments[1]) <= (two_pass + 5e-4) / (today - 5e-4) + 5e-3
    assert float(re.search(r"pixel difference: (\S+);", text).group(1)) < 1e-4  # same seeds, same images
    assert "training speed-up" in out.read_text()


def test_generated_bloodmnist_has_the_real_shape(tmp_path):
    path = protocol_timing.write_fake_bloodmnist(tmp_path / "b.npz", protocol_timing.SHAPE["train"])
    data = read_npz(path, "npz")
    assert (len(data.train), len(data.val), len(data.test)) == (11959, 1712, 3421)
    assert tuple(data.train.x.shape[1:]) == (3, 32, 32) and data.num_classes == 8


@pytest.mark.e2e
def test_protocol_timing_prints_the_per_stage_table(tmp_path, capsys):
    argv = ["--threads", "1", "--n_train", "64", "--data_root", str(tmp_path / "none"), "--work", str(tmp_path / "w")]
    argv += ["--out", str(tmp_path / "t.md"), "--epochs=1", "--syn_iterations=2", "--nb_generation=1"]
    assert protocol_timing.main([*argv, "--syn_batch_size=8", "--device=cpu"]) == 0
    text = capsys.readouterr().out
    rows = [line.split("|") for line in text.splitlines() if re.match(r"\| [1-4] \|", line)]
    assert [int(r[1]) for r in rows] == [1, 2, 3, 4]
    assert [r[2].strip() for r in rows] == ["-", "1 x 8 x 2", "1 x 8 x 2", "1 x 8 x 2"]  # synthesis before tasks 2-4
    assert all(float(r[4]) > 0 for r in rows)  # training time of every task (2 decimals: never 0.00 for 64 images)
    assert "generated" in text and re.search(r"total: \d+\.\d s", text) and "no verdict" in text
    assert (tmp_path / "w" / "run" / "impressions_task_4.png").is_file()


@pytest.mark.e2e
def test_ddp_speed_launches_each_process_count_and_prints_the_speed_up(tmp_path, capsys):
    data = write_digits(tmp_path / "digits4.npz", 4, 200)  # digits 0-3: 200 training images
    argv = ["--nproc", "1", "2", "--config", "configs/digits/finetune.yaml", "--work", str(tmp_path / "w")]
    argv += ["--out", str(tmp_path / "d.md"), "--epochs=1", "--dataset=npz", f"--data_path={data}"]
    argv += ["--nb_cl_fg=2", "--nb_cl=2", "--device=cpu"]
    assert ddp_speed.main(argv) == 0
    text = capsys.readouterr().out
    rows = [line.split("|") for line in text.splitlines() if re.match(r"\| [12] \|", line)]
    assert [int(r[1]) for r in rows] == [1, 2]
    assert rows[0][4].strip() == "1.00x" and re.fullmatch(r"\d+\.\d\dx", rows[1][4].strip())
    # the speed-up is the ratio of the training times, printed rounded: within what their rounding allows
    (one, two), half = (float(r[3]) for r in rows), 0.5 * 10 ** -len(rows[0][3].strip().split(".")[-1])
    assert (one - half) / (two + half) - 0.005 <= float(rows[1][4].strip()[:-1]) <= (one + half) / (two - half) + 0.005
    assert (tmp_path / "w" / "n2" / "task_2.pt").is_file() and "speed-up" in (tmp_path / "d.md").read_text()


@pytest.mark.e2e
def test_ddp_speed_refuses_bad_process_counts(capsys):
    with pytest.raises(SystemExit):
        ddp_speed.main(["--nproc", "0"])
    assert "--nproc values must be >= 1" in capsys.readouterr().err


# A bare CUDA machine's python3: medmnist, wandb and tensorboard cannot be imported (site runs this first).
BARE_MACHINE = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("medmnist", "wandb", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r} (a bare machine)", name=name)
        return None

sys.meta_path.insert(0, Absent())
"""


@pytest.mark.e2e
def test_gpu_check_shortened_runs_without_medmnist_wandb_tensorboard_and_opens_with_the_verdicts(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE_MACHINE)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    for name in ("medmnist", "wandb", "tensorboard"):  # the blocking works
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode == 1 and "a bare machine" in probe.stderr, probe.stderr
    out = tmp_path / "out"
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu_short", "--out", str(out)]
    result = subprocess.run(
        [*command, "--work", str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (out / "gpu_check_cpu.md").read_text().splitlines()
    verdicts = [gpu_check_report.VERDICT.match(line) for line in lines[:3]]
    assert [v["target"] for v in verdicts] == list(gpu_check_report.TARGETS) and lines[3] == ""
    assert all(v["state"] == "NOT MEASURED" for v in verdicts)  # a CPU run: the targets are for a GPU
    assert re.fullmatch(r"\d+\.\d\dx on the CPU; the target is for a GPU", verdicts[0]["detail"])
    assert re.fullmatch(r"\d+ s on the CPU, shortened, on a generated BloodMNIST-format file", verdicts[2]["detail"])
    text = "\n".join(lines)
    assert "optional packages (none needed): medmnist no, wandb no, tensorboard no" in text
    assert text.index("## 1. Correctness") < text.index("## 2. CCSI BloodMNIST") < text.index("## 3. Speed")
    correctness = [line.split("|") for line in lines if re.match(r"\| (training step|CCSI run)", line)]
    assert [r[2].strip() for r in correctness] == ["fp32"] * 3 + ["fp32 + syn_fused_moments"] * 2
    assert [float(r[6]) for r in correctness] == [gpu_check.STEP_TOLERANCE["fp32"], 3.0, 6.0, 3.0, 6.0]
    assert all(r[7].strip() == "ok" for r in correctness)
    assert re.search(r"^- data: generated .*fake_bloodmnist\.npz \(64 train images, BloodMNIST's shape", text, re.M)
    tasks = [line.split("|")[1].strip() for line in lines if re.match(r"\| [1-4] \| ", line)]
    assert tasks == ["1", "2", "3", "4"]  # the protocol's per-task table
    assert text.count("| training |") == 3 and text.count("| synthesis |") == 4  # speed.py's rows
    assert "FAILED" not in text and "stopped" not in text and re.search(r"^total: \d+\.\d s", text, re.M)
    assert {p.name for p in out.iterdir()} == {
        f"gpu_check_cpu{x}" for x in (".md", ".log", "_protocol.md", "_speed.md")
    }
    assert "task 2/2: test accuracy" in (out / "gpu_check_cpu.log").read_text()


def test_gpu_check_verdicts_on_a_gpu_compare_the_numbers_with_the_targets():
    speed_lines = [
        "training speed-up (fastest / reference): 6.10x (target on a GPU: >= 5x, met); today / ...",
        "synthesis speed-up (fastest / reference): 9.99x (target on a GPU: >= 10x, NOT met); today / ...",
    ]
    assert [v.split(": ", 1)[1] for v in gpu_check_report.speed_verdicts(speed_lines, gpu=True)] == [
        "MET (6.10x in bench/speed.py, same run)",
        "NOT MET (9.99x in bench/speed.py, same run)",
    ]
    failed = gpu_check_report.speed_verdicts(["speed: FAILED (RuntimeError: CUDA out of memory)"], gpu=True)
    assert failed[1].endswith(": NOT MEASURED (speed: FAILED (RuntimeError: CUDA out of memory))")

    def protocol(lines, gpu="NVIDIA H100 80GB HBM3", paper=True):
        return gpu_check_report.VERDICT.match(gpu_check_report.protocol_verdict(lines, gpu, paper)).groupdict()

    generated = "- data: generated runs/fake_bloodmnist.npz (11959 train images, BloodMNIST's shape; ...)"
    assert protocol([generated, "total: 179.4 s = 2.99 min (...)"])["state"] == "MET"
    finished = protocol([generated, "total: 200.0 s = 3.33 min (...)"], gpu="NVIDIA H200")
    assert finished["state"] == "NOT MET"
    assert finished["detail"] == (
        "3.33 min = 200 s on NVIDIA H200, on a generated BloodMNIST-format file; the target names an H100"
    )
    stopped = protocol(["stopped at the budget after 270 s; tasks done: [1, 2]", "", "| 1 | ..."])
    assert (stopped["state"], stopped["detail"]) == (
        "NOT MET",
        "over 270 s on NVIDIA H100 80GB HBM3; stopped at its budget; tasks done: [1, 2]",
    )
    assert protocol(["stopped at the budget after 60 s, before task 1 ended"])["state"] == "NOT MEASURED"
    assert protocol(["total: 100.0 s = 1.67 min"], paper=False)["state"] == "NOT MEASURED"
    assert protocol(["protocol: FAILED (ValueError: x)"])["detail"] == "protocol: FAILED (ValueError: x)"


def test_gpu_check_reports_a_stage_stopped_at_its_budget_and_the_protocol_tasks_done(tmp_path, monkeypatch):
    assert gpu_check.staged("slow", 1, lambda: time.sleep(5) or ["never"])[0] == "slow: stopped at its budget of 1 s"
    assert gpu_check.staged("bad", 5, lambda: 1 / 0)[0] == "bad: FAILED (ZeroDivisionError: division by zero)"
    run_task = engine.run_task

    def stop_after_task_1(state, task):
        run_task(state, task)
        raise gpu_check.StageTimeout

    monkeypatch.setattr(engine, "run_task", stop_after_task_1)
    fast = speed.make_config()
    lines = gpu_check.protocol(torch.device("cpu"), fast, True, tmp_path / "w", tmp_path / "p.md")
    assert re.match(r"stopped at the budget after \d+ s; tasks done: \[1\]", lines[0])
    assert [line.split("|")[1].strip() for line in lines if re.match(r"\| \d \| ", line)] == ["1"]


def test_ablation_custom_variants_and_the_paired_difference():
    name, (config_file, values, _) = ablation.parse_custom("fast:lr=0.05,config=configs/digits/icarl.yaml")
    assert (name, config_file, values) == ("fast", "configs/digits/icarl.yaml", {"lr": "0.05"})
    assert ablation.parse_custom("plain:")[1][:2] == (ablation.CCSI, {})
    with pytest.raises(ValueError, match="name:key=value"):
        ablation.parse_custom("broken:lr")
    records = [
        {"variant": "ref", "seed": 0, "last_accuracy": 80.0},
        {"variant": "ref", "seed": 1, "last_accuracy": 70.0},
        {"variant": "new", "seed": 1, "last_accuracy": 75.0},
        {"variant": "new", "seed": 0, "last_accuracy": 83.0},
        {"variant": "new", "seed": 2, "last_accuracy": 99.0},  # no reference run for seed 2: not paired
    ]
    assert ablation.paired_difference(records, "new", "ref") == (4.0, pytest.approx(math.sqrt(2.0)))  # 3 and 5


def test_the_end_of_run_split_counts_old_images_taken_as_new_classes():
    doc = {  # classes 0-2 old, 3-4 the last task's; rows: true class
        "confusion_matrix": [[8, 1, 0, 1, 0], [0, 5, 0, 3, 2], [0, 0, 10, 0, 0], [0, 0, 0, 4, 0], [1, 0, 0, 0, 6]],
        "task_sizes": [3, 2],
        "old_accuracy_per_task": [None, 76.67],
        "new_accuracy_per_task": [90.0, 90.91],
    }
    out = ablation.end_of_run(doc)
    assert out["old_as_new"] == pytest.approx(100 * 6 / 30)  # 1 + 3 + 2 of the 30 old images
    assert (out["old_last"], out["new_last"]) == (76.67, 90.91)


def test_recency_bias_rows_lower_the_last_task_logits_by_delta():
    logits = torch.tensor([[2.0, 1.0, 2.5], [0.0, 3.0, 3.4], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])  # classes 0-1 old
    y = torch.tensor([0, 1, 0, 2])
    rows = recency_bias.bias_rows(logits, y, n_old=2, deltas=(0.0, 0.45, math.inf))
    # delta 0: images 0 and 1 taken as class 2; 0.45: image 0 still (2.05 > 2.0); inf: image 3 lost too
    assert [(r["all"], r["old"], r["new"], r["old_as_new"]) for r in rows] == [
        (50.0, pytest.approx(100 / 3), 100.0, pytest.approx(200 / 3)),
        (75.0, pytest.approx(200 / 3), 100.0, pytest.approx(100 / 3)),
        (75.0, 100.0, 0.0, 0.0),
    ]


@pytest.mark.e2e
def test_recency_bias_reads_a_finished_run_back_to_its_own_last_accuracy(tmp_path, capsys):
    data = write_digits(tmp_path / "digits.npz", 10, 300)
    out = tmp_path / "run"
    overrides = {"method": "finetune", "dataset": "npz", "data_path": data, "nb_cl_fg": 8, "nb_cl": 2, "epochs": 1}
    done = engine.run(config.load_config(overrides={**overrides, "progress": False, "output_dir": str(out)}))
    assert recency_bias.main([str(out)]) == 0
    rows = [line.split("|")[2:7] for line in capsys.readouterr().out.splitlines()[2:]]
    assert float(rows[0][1]) == pytest.approx(done["last_accuracy"], abs=0.005)  # delta 0: the run's evaluation
    assert rows[-1][0].strip() == "inf" and float(rows[-1][3]) == 0.0 and float(rows[-1][4]) == 0.0
    assert recency_bias.main([str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path} holds no finished task (config.yaml and task_<t>.pt); give a run folder\n"
    )


def test_every_ablation_and_protocol_variant_is_a_valid_configuration():
    """A misspelt key or value in a variant table would only fail after the runs before it (hours on a CPU)."""
    for name, (config_file, values, _) in ablation.VARIANTS.items():
        cfg = config.load_config([ablation.ROOT / config_file], {**ablation.PROTOCOL, **values})
        assert all(getattr(cfg, k) == config.coerce(config.OPTIONS[k], v) for k, v in values.items()), name
    for name, (method, overrides) in protocols.VARIANTS.items():
        cfg = config.load_config([protocols.ROOT / f"configs/digits/{method}.yaml"], config.parse_overrides(overrides))
        assert cfg.method == method, name
    assert config.load_config([ablation.ROOT / ablation.CCSI], ablation.REFRESH).class_stats_update == "refresh"


@pytest.mark.e2e
def test_ablation_runs_a_variant_writes_the_table_and_reuses_the_finished_run(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--variants", "--custom", "it2:syn_iterations=2,syn_warmup=1", "--seeds", "0", "--reference", "it2"]
    argv += ["--out", str(out), "--runs", str(runs), "--epochs=1", "--nb_cl_fg=8", "--nb_cl=2", "--nb_generation=1"]
    argv += ["--syn_batch_size=8", "--syn_iterations=5", "--device=cpu"]  # the variant's own syn_iterations wins
    assert ablation.main(argv) == 0
    md = (out / "ablation.md").read_text()
    assert "`--idc_source=train` `--select_on=last` `--scheduler=none`" in md
    [row] = list(csv.DictReader((out / "runs.csv").open()))
    saved = (runs / "it2" / "seed0" / "config.yaml").read_text()
    assert "syn_iterations: 2\n" in saved and "select_on: last\n" in saved and "nb_generation: 1\n" in saved
    metrics = json.loads((runs / "it2" / "seed0" / "metrics.json").read_text())
    assert float(row["last_accuracy"]) == pytest.approx(metrics["last_accuracy"])
    assert re.search(r"\| it2 \| custom: .* \| 0 \| [0-9.]+ ± 0.00 \| [0-9.]+ ± 0.00 \| - \| [0-9.]+ ± 0.00 \|", md)
    stamp = (runs / "it2" / "seed0" / "task_2.pt").stat().st_mtime_ns
    assert ablation.main(argv) == 0  # same configuration: read back, not rerun
    assert (runs / "it2" / "seed0" / "task_2.pt").stat().st_mtime_ns == stamp
    capsys.readouterr()


@pytest.mark.e2e
def test_hard_digits_are_deterministic_stratified_and_in_medmnist_format(tmp_path):
    a = make_hard_digits.make(seed=0, copies=2, strength=1.0, noise=0.1)
    b = make_hard_digits.make(seed=0, copies=2, strength=1.0, noise=0.1)
    c = make_hard_digits.make(seed=1, copies=2, strength=1.0, noise=0.1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train_images"], c["train_images"])
    sizes = {s: len(a[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert sizes == {"train": 2 * 1079, "val": 2 * 179, "test": 2 * 539}  # 1797 source digits, 60/10/30
    assert a["train_images"].dtype == np.uint8 and a["train_images"].shape[1:] == (28, 28)
    assert a["test_labels"].shape == (2 * 539, 1) and set(np.unique(a["test_labels"])) == set(range(10))
    assert make_hard_digits.main(["--out", str(tmp_path / "hard.npz")]) == 0
    splits = read_npz(tmp_path / "hard.npz", "npz")
    assert splits.train.x.shape[1:] == (1, 32, 32) and len(splits.test) == 539 and splits.num_classes == 10  # padded


def test_gpu_check_sync_row_reports_a_host_sync_inside_a_step(tmp_path, monkeypatch):
    """The CUDA-only row, run on the CPU with set_sync_debug_mode standing in: Tensor.item raises while "error"."""
    original_item = torch.Tensor.item

    def set_sync_debug_mode(mode):
        def raising(*args, **kwargs):
            raise RuntimeError("called a synchronizing CUDA operation")

        monkeypatch.setattr(torch.Tensor, "item", raising if mode == "error" else original_item)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_sync_debug_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    clean = gpu_check.sync_free_steps(torch.device("cpu"), tmp_path / "a")
    assert clean.endswith("| fp32 | - | 3 of 3 steps | 0 | 0 | ok |"), clean
    step = CCSI.training_step
    monkeypatch.setattr(CCSI, "training_step", lambda self, batch: (batch.y.sum().item(), step(self, batch))[1])
    synced = gpu_check.sync_free_steps(torch.device("cpu"), tmp_path / "b")
    assert "| 0 of 3 steps | 1 | 0 | OUT OF TOLERANCE (step 1: called a synchronizing CUDA operation) |" in synced
    assert torch.Tensor.item is original_item  # the mode was left, the step raised or not
