"""Runs and sweeps that never mix or lose results: one folder per run, locks, overwrite, resume checks, chained
task sweeps choosing on validation accuracy, the local sweep runner with agent semantics, provenance, wandb summary."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import incremental_train_and_eval as engine
import main
from experiment.checkpoint import TaskCheckpoint, completed_tasks, task_checkpoint_path
from experiment.config import ConfigError
from methods.finetune import Finetune
from tiny import ROOT
from tuning import sweep

TINY = ["--epochs=1", "--batch_size=64", "--nb_cl_fg=4", "--nb_cl=3", "--device=cpu", "--progress=false"]


def run_main(args, capsys=None):
    code = main.main(["--config", str(ROOT / "configs/digits/finetune.yaml"), *TINY, *args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


# ----- one folder per run, provenance ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_default_folder_names_data_method_protocol_and_config_hash(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--output_dir=runs/{dataset}/{method}/{protocol}/seed{seed}-{config_hash}"])[0] == 0
    assert run_main(["--output_dir=runs/{dataset}/{method}/{protocol}/seed{seed}-{config_hash}", "--lr=0.05"])[0] == 0
    folders = sorted((tmp_path / "runs/digits/finetune/improved").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("seed0-") for f in folders)  # two configs, two folders
    for folder in folders:
        doc = metrics(folder)
        ckpt = TaskCheckpoint.load(task_checkpoint_path(folder, 3))
        assert folder.name == f"seed0-{doc['config_hash']}" and ckpt.config_hash == doc["config_hash"]
        assert (doc["method"], doc["dataset"], doc["protocol"], doc["seed"]) == ("finetune", "digits", "improved", 0)
        assert len(doc["commit"]) == 40 or doc["commit"] == "unknown"
        assert set(doc["versions"]) >= {"python", "torch", "torchvision", "medmnist"} and "cpu" in doc["device"]
        header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
        assert header[:6] == ["method", "dataset", "protocol", "seed", "config_hash", "commit"]


@pytest.mark.e2e
def test_npz_provenance_records_the_file_and_its_sha256(tmp_path, capsys):
    import hashlib

    from tiny import write_fake_medmnist

    data = tmp_path / "mine.npz"
    write_fake_medmnist(data, 4, 1)
    code = main.main([*TINY[:1], "--dataset=npz", f"--data_path={data}", "--nb_cl_fg=2", "--nb_cl=2",
                      "--device=cpu", "--progress=false", f"--output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    doc = metrics(tmp_path / "run")
    assert (
        doc["data_path"] == str(data.resolve()) and doc["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    )


# ----- nothing lost, nothing mixed ---------------------------------------------------------------------------------


HOLD_LOCK = "import sys, time; from experiment.run_folder import RunFolder\nwith RunFolder(sys.argv[1]).lock():\n"


@pytest.mark.e2e
def test_a_second_run_into_a_locked_folder_is_refused_and_a_killed_owners_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK + "    print('locked', flush=True); time.sleep(60)", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_main([f"--output_dir={out}"], capsys)
        assert code == 2 and f"is in use by process {holder.pid} on " in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and json.loads((out / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock; its record stays in .lock
        holder.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    assert run_main([f"--output_dir={out}"], capsys)[0] == 0  # taken over from the dead owner
    assert not (out / ".lock").exists() and completed_tasks(out) == [1, 2, 3]


@pytest.mark.e2e
def test_overwrite_moves_the_old_run_aside_so_a_killed_rerun_never_adopts_its_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_main([f"--output_dir={out}", "--seed=0"])[0] == 0
    reference = tmp_path / "seed1"
    assert run_main([f"--output_dir={reference}", "--seed=1"])[0] == 0

    def stop(self, ctx, epoch):
        if ctx.task == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Finetune, "on_epoch_start", stop)
    assert run_main([f"--output_dir={out}", "--seed=1", "--overwrite=true"])[0] == 130
    monkeypatch.undo()
    [aside] = list(out.glob("replaced-*"))
    assert completed_tasks(aside) == [1, 2, 3] and completed_tasks(out) == [1]  # seed 0's run, intact
    assert run_main([f"--output_dir={out}", "--seed=1", "--resume=true"])[0] == 0
    assert metrics(out)["accuracy_matrix"] == metrics(reference)["accuracy_matrix"]  # seed 1 only


def test_a_process_whose_checkout_moved_on_records_the_code_it_imported_marked_dirty(monkeypatch):
    """A long-lived process (bench/compare_methods.py) imported commit a; runs it starts after commit b landed
    execute a's modules: they record a, marked dirty, never b."""
    from experiment import provenance

    loaded = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(provenance, "git_commit", lambda root=None: {"commit": "b" * 40, "dirty": False})
    assert provenance.process_code(loaded) == {"commit": "a" * 40, "dirty": True}
    monkeypatch.setattr(provenance, "git_commit", lambda root=None: dict(loaded))
    assert provenance.process_code(loaded) == loaded  # the checkout it imported: as it is


@pytest.mark.e2e
def test_a_resume_with_other_code_says_so_in_one_line_and_each_task_records_its_commit(tmp_path, monkeypatch, caplog):
    from experiment import provenance

    out = tmp_path / "run"
    code = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(provenance, "git_commit", lambda root=None: dict(code))
    monkeypatch.setattr(engine, "LOADED_CODE", dict(code))  # as a process started on commit a imports it

    def stop(self, ctx, epoch):
        if ctx.task == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Finetune, "on_epoch_start", stop)
        assert run_main([f"--output_dir={out}"])[0] == 130
    code.update(commit="b" * 40, dirty=True)  # a new commit, with uncommitted changes
    monkeypatch.setattr(engine, "LOADED_CODE", dict(code))  # the resume is a new process: it imports b
    monkeypatch.setattr(provenance, "git_commit", lambda root=None: {"commit": "c" * 40, "dirty": False})  # c lands
    caplog.clear()
    assert run_main([f"--output_dir={out}", "--resume=true"])[0] == 0
    lines = [r.getMessage() for r in caplog.records if "other code" in r.getMessage()]
    assert lines == [
        f"resuming with other code than task 1 ran with: commit {'b' * 12} with uncommitted changes now, commit "
        f"{'a' * 12} then (each task's commit is recorded in metrics.json)"
    ]
    doc = metrics(out)
    assert [t["code"] for t in doc["tasks"]] == [
        {"commit": "a" * 40, "dirty": False},
        {"commit": "b" * 40, "dirty": True},
        {"commit": "b" * 40, "dirty": True},
    ]
    assert (doc["commit"], doc["dirty"]) == ("b" * 40, True)  # the code that finished the run, not the checkout's c
    first = TaskCheckpoint.load(task_checkpoint_path(out, 1)).metrics["tasks"][0]["extra"]["code"]
    assert first == {"commit": "a" * 40, "dirty": False}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("first", "args", "message"),
    [
        (["--task=1"], ["--task=1"], "already holds checkpoints of tasks [1]"),
        (["--task=1"], ["--resume=true", "--lr=0.05"], "other values of lr (0.1 there, 0.05 now)"),
        ([], ["--resume=true"], "already completed task 3"),
        ([], ["--task=2", "--saved_model_address={out}/task_1.pt"], "already holds checkpoints of tasks [1, 2, 3]"),
    ],
)
def test_reruns_into_a_run_folder_are_refused_in_one_line_and_write_nothing(tmp_path, capsys, first, args, message):
    out = tmp_path / "run"
    assert run_main([f"--output_dir={out}", "--lr=0.1", *first], capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, err = run_main([f"--output_dir={out}", "--lr=0.1", *(a.format(out=out) for a in args)], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


@pytest.mark.e2e
def test_continuing_into_a_folder_of_another_run_is_refused(tmp_path, capsys):
    finished, other = tmp_path / "finished", tmp_path / "other"
    assert run_main([f"--output_dir={finished}"], capsys)[0] == 0
    assert run_main([f"--output_dir={other}", "--task=1"], capsys)[0] == 0
    code, err = run_main(
        [f"--output_dir={finished}", "--task=2", f"--saved_model_address={task_checkpoint_path(other, 1)}"], capsys
    )
    assert code == 2 and "already holds checkpoints of tasks [1, 2, 3]" in err


@pytest.mark.e2e
def test_resume_with_nothing_to_resume_and_stale_temporaries(tmp_path, capsys):
    code, err = run_main([f"--output_dir={tmp_path / 'empty'}", "--resume=true"], capsys)
    assert code == 2 and "holds nothing to resume" in err
    out = tmp_path / "run"
    out.mkdir()
    (out / ".task_1.pt.4242.cilpart").write_bytes(b"half a checkpoint")  # of a killed write of this project
    (out / ".notes.tmp").write_bytes(b"the user's")
    (out / "mine.tmp").write_bytes(b"the user's")
    assert run_main([f"--output_dir={out}"], capsys)[0] == 0
    assert not list(out.glob("*.cilpart")) and not list(out.glob(".*.cilpart"))
    assert (out / ".notes.tmp").read_bytes() == (out / "mine.tmp").read_bytes() == b"the user's"  # kept


@pytest.mark.e2e
def test_a_chain_keeps_each_tasks_config_and_refuses_other_experiment_keys(tmp_path, capsys):
    out = tmp_path / "chain"
    assert run_main([f"--output_dir={out}", "--task=1"], capsys)[0] == 0
    first = task_checkpoint_path(out, 1)
    code, err = run_main([f"--output_dir={out}", "--task=2", f"--saved_model_address={first}", "--seed=3"], capsys)
    assert code == 2 and "other values of seed (0 there, 3 now)" in err
    assert run_main([f"--output_dir={out}", "--task=2", f"--saved_model_address={first}", "--lr=0.05"], capsys)[0] == 0
    assert yaml.safe_load((out / "config_task_1.yaml").read_text())["lr"] == 0.1
    assert yaml.safe_load((out / "config_task_2.yaml").read_text())["lr"] == 0.05
    assert len(metrics(out)["accuracy_matrix"]) == 2


# ----- chained task sweeps ---------------------------------------------------------------------------------------


def write_sweep(path, parameters, config_file="configs/digits/finetune.yaml", method="grid", **extra):
    spec = {
        "program": "main.py",
        "method": method,
        "metric": {"name": "final/last_val_accuracy", "goal": "maximize"},
        "command": [sys.executable, "${program}", "--config", config_file, "${args}"],
        "parameters": parameters,
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.e2e
def test_a_two_point_task_sweep_chains_to_the_better_point_on_val(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    sweeps = tmp_path / "sweeps"
    common = {"nb_cl_fg": {"value": 4}, "nb_cl": {"value": 3}, "epochs": {"value": 2}, "progress": {"value": False}}
    common["batch_size"] = {"value": 64}  # half the steps: the test's time
    task1 = {
        **common,
        "task": {"value": 1},
        "lr": {"values": [0.1, 0.0001]},  # the second barely moves from the random init
        "output_dir": {"value": str(sweeps / "task_1" / "seed{seed}-{config_hash}")},
    }
    assert sweep.main([str(write_sweep(tmp_path / "t1.yaml", task1))]) == 0
    points = sorted((sweeps / "task_1").iterdir())
    assert len(points) == 2 and all(completed_tasks(p) == [1] for p in points)  # two folders, both intact
    val = {p: metrics(p)["val_accuracy_per_task"][0] for p in points}
    best = max(val, key=val.get)
    assert val[best] > min(val.values()) + 10
    task2 = {
        **common,
        "task": {"value": 2},
        "saved_model_address": {"value": f"best:{sweeps / 'task_1'}"},
        "output_dir": {"value": str(sweeps / "task_2" / "seed{seed}-{config_hash}")},
    }
    capsys.readouterr()
    assert sweep.main([str(write_sweep(tmp_path / "t2.yaml", task2))]) == 0
    [chained] = list((sweeps / "task_2").iterdir())
    saved = yaml.safe_load((chained / "config_task_2.yaml").read_text())
    assert Path(saved["saved_model_address"]) == task_checkpoint_path(best, 1)
    assert metrics(chained)["accuracy_per_task"][0] == metrics(best)["accuracy_per_task"][0]
    capsys.readouterr()
    assert main.main(["best", str(sweeps / "task_1"), "--task=1"]) == 0
    assert capsys.readouterr().out.strip() == str(task_checkpoint_path(best, 1))


# ----- the local runner has the agent's semantics ----------------------------------------------------------------


@pytest.mark.e2e
def test_runner_passes_values_as_the_agent_does_and_applies_overrides(tmp_path, capsys):
    params = {"do_flip": {"value": True}, "class_order": {"value": [1, 0]}, "lr": {"values": [0.1, 0.2]}}
    path = write_sweep(tmp_path / "s.yaml", params, run_cap=1)
    assert sweep.main([str(path), "--dry-run", "--epochs=1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 1  # run_cap
    assert "--do_flip=True --class_order=[1, 0] --lr=0.1 --epochs=1" in lines[0].replace("'", "")


def test_random_search_draws_run_cap_points_reproducibly():
    spec = {
        "method": "random",
        "run_cap": 5,
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
            "epochs": {"distribution": "int_uniform", "min": 1, "max": 3},
            "augment": {"values": ["none", "flip"]},
        },
    }
    a, b = sweep.points(spec, None, seed=7), sweep.points(spec, None, seed=7)
    assert a == b and len(a) == 5 and a != sweep.points(spec, None, seed=8)
    assert all(1e-4 <= p["lr"] <= 1e-1 and p["epochs"] in (1, 2, 3) for p in a)
    assert len(sweep.points(spec, 2, seed=7)) == 2  # --count


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("program: main.py\nmethod: grid\nparameters:\n  lr: {values: []}\n", "'values' must be a non-empty list"),
        ("program: main.py\nmethod: grid\nparameters:\n  lr: {values: 5}\n", "'values' must be a non-empty list"),
        ("program: main.py\ncommand: 5\nparameters:\n  lr: {value: 1}\n", "'command' must be a list"),
        ("program: main.py\nmethod: bayes\nparameters:\n  lr: {values: [1, 2]}\n", "bayes needs the wandb server"),
        ("program: main.py\nmethod: random\nparameters:\n  lr: {values: [1, 2]}\n", "give run_cap or --count"),
        ("program: main.py\nparameters:\n  lr: {distribution: uniform, min: 0, max: 1}\n", "use method: random"),
        ("program: main.py\nparameters: {}\n", "non-empty 'parameters'"),
    ],
)
def test_malformed_sweep_files_are_refused_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main.main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.e2e
def test_sweep_runner_refuses_unknown_override_keys(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {"lr": {"values": [0.1]}})
    assert main.main(["sweep", str(path), "--dry-run", "--lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown configuration key 'lrr' in the command line (did you mean 'lr'?)"
    with pytest.raises(ConfigError, match="unexpected argument 'x'"):
        sweep.parse_args(["file.yaml", "x"])


# ----- wandb --------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_wandb_offline_run_records_val_test_and_the_final_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert run_main([f"--output_dir={out}", "--logger=wandb"], capsys)[0] == 0
    [record] = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    keys = ["task/test_accuracy", "task/val_accuracy", "final/average_incremental_accuracy", "final/last_accuracy"]
    keys += ["final/forgetting", "final/backward_transfer", "final/last_val_accuracy"]
    for _ in range(60):  # wandb's service process may still be writing the file
        missing = [key for key in keys if key.encode() not in record.read_bytes()]
        if not missing:
            break
        time.sleep(1)
    assert not missing, missing
