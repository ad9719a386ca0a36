"""The task loop end to end on digits: bounds, resume and per-task equivalence, bad input."""

import json
import math

import pytest
import torch

import main
from experiment.checkpoint import load_checkpoint, task_checkpoint_path
from experiment.config import ConfigError
from experiment.errors import CheckpointError, TrainingError
from incremental_train_and_eval import run
from methods import METHODS
from methods.finetune import Finetune
from tiny import write_digits

THREE_TASKS = {"nb_cl_fg": 4, "nb_cl": 3}  # digits: tasks of 4, 3, 3 classes


def read_metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.e2e
def test_finetune_forgets_and_joint_does_not(make_cfg, tmp_path):
    common = {"epochs": 2, "lr": 0.1, "nb_cl_fg": 2, "nb_cl": 2}  # measured: finetune last 18.4, joint 93.3
    ft = run(make_cfg(method="finetune", output_dir=str(tmp_path / "ft"), **common))
    joint = run(make_cfg(method="joint", output_dir=str(tmp_path / "joint"), **common))
    # finetune: only the last task's two classes survive
    assert ft["last_accuracy"] < 35 and ft["forgetting"] > 50
    assert joint["last_accuracy"] > 85 and joint["forgetting"] < 15
    assert len(ft["accuracy_matrix"]) == 5 and len(joint["accuracy_per_task"]) == 5
    for name in ("metrics.json", "metrics.csv", "config.yaml", "task_5.pt"):
        assert (tmp_path / "ft" / name).is_file()
    for stem in ("accuracy_per_task", "accuracy_matrix", "confusion_matrix"):  # figures as PNG and PDF
        assert (tmp_path / "ft" / f"{stem}.png").is_file() and (tmp_path / "ft" / f"{stem}.pdf").is_file()


@pytest.mark.e2e
def test_per_task_runs_equal_one_uninterrupted_run(make_cfg, tmp_path):
    full = run(make_cfg(output_dir=str(tmp_path / "full"), **THREE_TASKS))
    step = tmp_path / "steps"
    run(make_cfg(output_dir=str(step), task=1, **THREE_TASKS))
    for t in (2, 3):
        previous = task_checkpoint_path(step, t - 1)
        run(make_cfg(output_dir=str(step), task=t, saved_model_address=str(previous), overwrite=True, **THREE_TASKS))
    assert read_metrics(step)["accuracy_matrix"] == full["accuracy_matrix"]
    a = load_checkpoint(task_checkpoint_path(tmp_path / "full", 3))["method"]["net"]
    b = load_checkpoint(task_checkpoint_path(step, 3))["method"]["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_resume_continues_from_the_last_complete_task(make_cfg, tmp_path):
    full = run(make_cfg(output_dir=str(tmp_path / "full"), **THREE_TASKS))
    part = tmp_path / "part"
    run(make_cfg(output_dir=str(part), task=1, **THREE_TASKS))
    resumed = run(make_cfg(output_dir=str(part), resume=True, **THREE_TASKS))
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["average_incremental_accuracy"] == full["average_incremental_accuracy"]


RESUMABLE = {
    "finetune": {"method": "finetune", "momentum": 0.9, "scheduler": "step", "lr_milestones": [2]},
    "ccsi": {"method": "ccsi", "select_on": "val", "scheduler": "plateau", "lr_patience": 0, "nb_generation": 2,
             "syn_batch_size": 8, "syn_iterations": 3, "syn_warmup": 1, "idc_source": "val", "batch_size": 64,
             "rs_ratio": 0.2, "epochs": 3},
}  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_resume_inside_a_task_equals_the_uninterrupted_run(make_cfg, tmp_path, monkeypatch, method):
    """Stopped in task 2 after its 2nd epoch, resumed from task_2_partial.pt: bit-identical results."""
    data = write_digits(tmp_path / "digits.npz", 10, 400)  # 400 training images: a third of digits, a third the time
    values = {**THREE_TASKS, "epochs": 4, "save_every_epochs": 1, **RESUMABLE[method], "dataset": "npz"}
    values["data_path"] = data
    full = run(make_cfg(output_dir=str(tmp_path / "full"), **values))
    assert not list((tmp_path / "full").glob("*_partial.pt"))  # removed once each task completes
    cls = METHODS[method]
    original = cls.on_epoch_start

    def stop_in_task_2(self, ctx, epoch):
        if ctx.task == 2 and epoch == 2:
            raise KeyboardInterrupt
        return original(self, ctx, epoch)

    monkeypatch.setattr(cls, "on_epoch_start", stop_in_task_2)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(output_dir=str(part), **values))
    assert load_checkpoint(part / "task_2_partial.pt")["epoch"] == 2 and not (part / "task_2.pt").exists()
    monkeypatch.setattr(cls, "on_epoch_start", original)
    resumed = run(make_cfg(output_dir=str(part), resume=True, **values))
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert read_metrics(part)["tasks"][1]["history"] == read_metrics(tmp_path / "full")["tasks"][1]["history"]
    assert (part / "history.csv").read_text() == (tmp_path / "full" / "history.csv").read_text()
    a = load_checkpoint(task_checkpoint_path(tmp_path / "full", 3))["method"]["net"]
    b = load_checkpoint(task_checkpoint_path(part, 3))["method"]["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_a_partial_task_of_another_configuration_is_refused_and_one_of_other_run_keys_resumes(
    make_cfg, tmp_path, monkeypatch
):
    values = {**THREE_TASKS, "epochs": 3, "save_every_epochs": 1}

    def stop(self, ctx, epoch):
        if ctx.task == 1 and epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Finetune, "on_epoch_start", stop)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(**values))
    monkeypatch.undo()
    with pytest.raises(
        CheckpointError, match=r"task_1_partial.pt was trained with other values of lr \(0.05 there, 0.01 now\)"
    ):
        run(make_cfg(resume=True, **{**values, "lr": 0.01}))
    # one rule for both resume paths: keys of scope "run" may change (here, as for a finished task)
    resumed = run(make_cfg(resume=True, **{**values, "eval_batch_size": 7}))
    assert resumed["num_tasks"] == 3


@pytest.mark.e2e
def test_existing_run_is_not_overwritten_silently(make_cfg, tmp_path):
    cfg = make_cfg(task=1, **THREE_TASKS)
    run(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume=true"):
        run(make_cfg(**THREE_TASKS))


@pytest.mark.e2e
def test_task_needs_the_previous_checkpoint(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="task 2 needs --saved_model_address"):
        run(make_cfg(task=2, **THREE_TASKS))
    run(make_cfg(task=1, **THREE_TASKS))
    first = str(task_checkpoint_path(tmp_path / "run", 1))
    with pytest.raises(CheckpointError, match="checkpoint of task 1, but task 3 needs that of task 2"):
        run(make_cfg(task=3, saved_model_address=first, overwrite=True, **THREE_TASKS))


@pytest.mark.e2e
def test_corrupt_checkpoint_gives_one_line_error(make_cfg, tmp_path, capsys):
    bad = tmp_path / "task_1.pt"
    bad.write_bytes(b"PK\x03\x04 not a whole zip archive")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        run(make_cfg(task=2, saved_model_address=str(bad), **THREE_TASKS))
    code = main.main(
        [
            "--dataset=digits",
            "--device=cpu",
            f"--output_dir={tmp_path / 'r'}",
            "--task=2",
            f"--saved_model_address={bad}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: checkpoint")


@pytest.mark.e2e
def test_checkpoint_of_another_split_is_refused(make_cfg, tmp_path):
    run(make_cfg(task=1, **THREE_TASKS))
    first = str(task_checkpoint_path(tmp_path / "run", 1))
    with pytest.raises(CheckpointError, match="other values of nb_cl"):
        run(make_cfg(task=2, saved_model_address=first, overwrite=True, nb_cl_fg=2, nb_cl=2))


@pytest.mark.e2e
def test_nan_loss_stops_with_a_clear_error(make_cfg, monkeypatch):
    def nan_step(self, batch):
        loss = self.net(batch.x)["logits"].sum() * math.nan
        return {"loss": loss, "ce": loss}

    monkeypatch.setattr(Finetune, "training_step", nan_step)
    with pytest.raises(TrainingError, match="task 1 epoch 1: loss term 'loss' is nan"):
        run(make_cfg(**THREE_TASKS))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lrr=0.1"], "error: unknown configuration key 'lrr' in the command line (did you mean 'lr'?)"),
        (["--epochs=-2"], "error: key 'epochs': must be >= 0, got -2"),
        (["--config", "nope.yaml"], "error: config file not found: nope.yaml"),
    ],
)
def test_main_reports_bad_input_in_one_line(args, expected, capsys):
    assert main.main(args) == 2
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.e2e
def test_selection_on_val_keeps_the_best_epoch(make_cfg):
    summary = run(make_cfg(select_on="val", epochs=3, **THREE_TASKS))
    assert len(summary["accuracy_per_task"]) == 3


@pytest.mark.e2e
def test_after_step_follows_every_optimiser_step(make_cfg, monkeypatch):
    events = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        events.append("step")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    monkeypatch.setattr(Finetune, "after_step", lambda self: events.append("after_step"))
    run(make_cfg(epochs=2, batch_size=100, nb_cl_fg=5, nb_cl=5))  # 2 tasks of ~540 images: 6 batches per epoch
    assert events == ["step", "after_step"] * (2 * 2 * 6)
