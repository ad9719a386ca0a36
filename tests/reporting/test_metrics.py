"""Metrics checked against values computed by hand."""

import csv
import json

import pytest
import torch

from experiment import config
from reporting.metrics import RunMetrics, TaskEvaluation, evaluate_predictions, format_results_table


def test_evaluate_predictions_every_field_by_hand():
    # 2 tasks x 2 classes; class counts 3, 1, 2, 4 (unequal, so balanced != sample-weighted accuracy)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    pred = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3, 0, 3])
    ev = evaluate_predictions(pred, y, [2, 2])
    # correct per class: 2/3, 1/1, 1/2, 3/4 -> 7/10 overall
    assert ev.accuracy == pytest.approx(70.0)
    assert ev.per_class == pytest.approx([200 / 3, 100.0, 50.0, 75.0])
    assert ev.balanced_accuracy == pytest.approx((200 / 3 + 100 + 50 + 75) / 4)  # 72.916...
    assert ev.per_task == pytest.approx([75.0, 400 / 6])  # task 1: 3/4, task 2: 4/6
    assert ev.old_accuracy == pytest.approx(75.0)
    assert ev.new_accuracy == pytest.approx(400 / 6)
    assert ev.confusion == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 3]]
    assert ev.task_sizes == [2, 2] and ev.n_seen == 4
    assert isinstance(ev.accuracy, float) and all(isinstance(v, int) for row in ev.confusion for v in row)


def test_evaluate_predictions_first_task_and_absent_class():
    # one task of 3 classes, class 1 has no test sample: it is left out of the balanced accuracy
    ev = evaluate_predictions(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]), [3])
    assert ev.old_accuracy is None
    assert ev.per_class[0] == pytest.approx(50.0) and ev.per_class[1] is None and ev.per_class[2] == 100.0
    assert ev.balanced_accuracy == pytest.approx(75.0)
    assert ev.accuracy == pytest.approx(200 / 3)
    assert ev.per_task == pytest.approx([200 / 3]) and ev.new_accuracy == pytest.approx(200 / 3)
    assert ev.confusion == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_evaluate_predictions_rejects_bad_input():
    with pytest.raises(ValueError, match="outside the 4 classes"):
        evaluate_predictions(torch.tensor([4]), torch.tensor([0]), [2, 2])
    with pytest.raises(ValueError, match="outside"):
        evaluate_predictions(torch.tensor([0]), torch.tensor([-1]), [2, 2])
    with pytest.raises(ValueError, match="equal length"):
        evaluate_predictions(torch.tensor([0, 1]), torch.tensor([0]), [2])
    with pytest.raises(ValueError, match="empty"):
        evaluate_predictions(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), [2])
    with pytest.raises(ValueError, match="positive"):
        evaluate_predictions(torch.tensor([0]), torch.tensor([0]), [2, 0])


def _evaluation(correct_per_task: list[int]) -> TaskEvaluation:
    """2 classes per task, 10 test images per class; ``k`` of a task's 20 images are right, the rest swapped."""
    ys, preds = [], []
    for t, k in enumerate(correct_per_task):
        y = torch.tensor([2 * t] * 10 + [2 * t + 1] * 10)
        pred = y.clone()
        pred[k:] = 4 * t + 1 - y[k:]  # the other class of the same task
        ys.append(y)
        preds.append(pred)
    return evaluate_predictions(torch.cat(preds), torch.cat(ys), [2] * len(correct_per_task))


# R (percent): after task 1: [90]; after task 2: [95, 80]; after task 3: [70, 50, 85]
_CORRECT = [[18], [19, 16], [14, 10, 17]]


def _three_tasks() -> RunMetrics:
    m = RunMetrics()
    for t, correct in enumerate(_CORRECT, start=1):
        m.add(t, _evaluation(correct), {"val_accuracy": 50.0 + t, "protocol": "ccsi"})
    return m


def test_run_metrics_three_tasks_by_hand():
    s = _three_tasks().summary()
    assert s["accuracy_matrix"] == [
        pytest.approx([90.0, None, None]),
        pytest.approx([95.0, 80.0, None]),
        pytest.approx([70.0, 50.0, 85.0]),
    ]
    assert s["accuracy_matrix"][0][1:] == [None, None] and s["accuracy_matrix"][1][2] is None
    acc = [90.0, 87.5, 205 / 3]
    assert s["accuracy_per_task"] == pytest.approx(acc)
    assert s["balanced_accuracy_per_task"] == pytest.approx(acc)  # equal class counts
    assert s["old_accuracy_per_task"][0] is None
    assert s["old_accuracy_per_task"][1:] == pytest.approx([95.0, 60.0])
    assert s["new_accuracy_per_task"] == pytest.approx([90.0, 80.0, 85.0])
    assert s["average_incremental_accuracy"] == pytest.approx(sum(acc) / 3)  # 81.944...
    assert s["last_accuracy"] == pytest.approx(205 / 3)
    # forgetting: task 1: max(90, 95) - 70 = 25; task 2: 80 - 50 = 30 -> 27.5 (the max over past rows matters)
    assert s["forgetting"] == pytest.approx(27.5)
    # BWT: ((70 - 90) + (50 - 80)) / 2
    assert s["backward_transfer"] == pytest.approx(-25.0)
    assert len(s["per_class_accuracy"]) == 6 and s["per_class_accuracy"][2] == pytest.approx(100.0)
    assert s["per_class_accuracy"][3] == pytest.approx(0.0)  # task 2 half right: class 2 all right, class 3 none
    assert len(s["confusion_matrix"]) == 6 and s["confusion_matrix"][3][2] == 10


def test_single_task_has_no_forgetting_and_order_is_checked():
    m = RunMetrics()
    with pytest.raises(ValueError, match="no task"):
        m.summary()
    with pytest.raises(ValueError, match="expected the evaluation of task 1, got task 2"):
        m.add(2, _evaluation([18, 18]))
    with pytest.raises(ValueError, match="covers 2 tasks"):
        m.add(1, _evaluation([18, 18]))
    m.add(1, _evaluation([18]))
    s = m.summary()
    assert s["forgetting"] is None and s["backward_transfer"] is None
    assert s["average_incremental_accuracy"] == pytest.approx(90.0) == s["last_accuracy"]


def test_to_dict_round_trip_and_resume_reproduce_the_summary():
    full = _three_tasks()
    restored = RunMetrics.from_dict(json.loads(json.dumps(full.to_dict())))
    assert restored.summary() == full.summary()
    assert restored.extras == full.extras
    # resume after task 2, then evaluate task 3: same summary as the uninterrupted run
    partial = RunMetrics()
    for t, correct in enumerate(_CORRECT[:2], start=1):
        partial.add(t, _evaluation(correct), {"val_accuracy": 50.0 + t, "protocol": "ccsi"})
    resumed = RunMetrics.from_dict(partial.to_dict())
    resumed.add(3, _evaluation(_CORRECT[2]), {"val_accuracy": 53.0, "protocol": "ccsi"})
    assert resumed.summary() == full.summary()


def test_write_json_and_csv(tmp_path):
    m = _three_tasks()
    m.extras[0]["epoch_seconds"] = torch.tensor([1.5, 2.5])  # tensors in extras are written as lists
    info = {"method": "ccsi", "dataset": "digits", "protocol": "clean", "seed": 3, "config_hash": "0a1b2c3d"}
    cfg = {**config.defaults(), "lr": 0.05, "seed": 3, "output_dir": "elsewhere", "per_task": {2: {"lr": 0.01}}}
    json_path, csv_path = m.write(tmp_path / "run", {**info, "commit": "abc"}, cfg)
    doc = json.loads(json_path.read_text())
    for key in (
        "accuracy_matrix",
        "accuracy_per_task",
        "balanced_accuracy_per_task",
        "average_incremental_accuracy",
        "last_accuracy",
        "forgetting",
    ):
        assert key in doc
    assert doc["seed"] == 3 and doc["commit"] == "abc"  # the provenance leads the document
    assert doc["forgetting"] == pytest.approx(27.5)
    assert doc["accuracy_matrix"][0] == [90.0, None, None]
    assert doc["tasks"][0] == {"task": 1, "val_accuracy": 51.0, "protocol": "ccsi", "epoch_seconds": [1.5, 2.5]}
    rows = list(csv.reader(csv_path.open()))
    # the result-changing keys that differ from the defaults (seed is a provenance column; output_dir changes
    # nothing), then the task's numbers, then the run's final numbers on every row
    assert rows[0] == [
        "method", "dataset", "protocol", "seed", "config_hash", "commit", "lr", "per_task",
        "task", "n_seen", "accuracy", "balanced_accuracy", "old_accuracy", "new_accuracy", "val_accuracy",
        "R_task1", "R_task2", "R_task3", "average_incremental_accuracy", "last_accuracy", "forgetting",
    ]  # fmt: skip
    lead = ["ccsi", "digits", "clean", "3", "0a1b2c3d", "abc", "0.05", '{"2":{"lr":0.01}}']
    final = ["81.9444", "68.3333", "27.5000"]  # mean of 90, 87.5, 68.33; the last; forgetting by hand above
    assert rows[1] == [*lead, "1", "2", "90.0000", "90.0000", "", "90.0000", "51.0000", "90.0000", "", "", *final]
    assert rows[3][8:10] == ["3", "6"] and [float(v) for v in rows[3][15:18]] == pytest.approx([70.0, 50.0, 85.0])
    assert rows[3][-3:] == final and len(rows) == 4
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.csv", "metrics.json"]  # no temporary left


def test_format_results_table():
    s = _three_tasks().summary()
    rows = [
        {"method": "ccsi", "dataset": "bloodmnist", "protocol": "B0-2", **s},
        {"method": "finetune", "dataset": "bloodmnist", "average_incremental_accuracy": "40.00 ± 1.00",
         "last_accuracy": 20.0, "forgetting": None, "accuracy_per_task": [90.0, 45.0]},
    ]  # fmt: skip
    lines = format_results_table(rows).splitlines()
    assert lines[0].split() == [
        "method",
        "dataset",
        "protocol",
        "avg_inc_acc",
        "last_acc",
        "forgetting",
        "T1",
        "T2",
        "T3",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["ccsi", "bloodmnist", "B0-2", "81.94", "68.33", "27.50", "90.00", "87.50", "68.33"]
    assert lines[3].split() == [
        "finetune",
        "bloodmnist",
        "-",
        "40.00",
        "±",
        "1.00",
        "20.00",
        "-",
        "90.00",
        "45.00",
        "-",
    ]
    assert "protocol" not in format_results_table(rows[1:])
    assert format_results_table([]) == "(no results)"


def test_history_csv_one_row_per_epoch_with_each_tasks_terms(tmp_path):
    m = _three_tasks()
    m.extras[0]["history"] = [
        {"epoch": 1, "lr": 0.1, "loss": 2.5, "ce": 2.5},
        {"epoch": 2, "lr": 0.01, "loss": 1.25, "ce": 1.25},
    ]
    m.extras[1]["history"] = [{"epoch": 1, "lr": 0.1, "loss": 3.0, "ce": 2.0, "kd": 1.0, "monitor_accuracy": 75.5}]
    path = m.write_history(tmp_path)
    rows = list(csv.reader(path.open()))
    assert rows == [
        ["task", "epoch", "lr", "loss", "ce", "kd", "monitor_accuracy"],
        ["1", "1", "0.1", "2.5", "2.5", "", ""],
        ["1", "2", "0.01", "1.25", "1.25", "", ""],
        ["2", "1", "0.1", "3", "2", "1", "75.5"],
    ]
    m.extras[2]["history"] = []
    m.write_history(tmp_path, in_progress=[{"epoch": 1, "lr": 0.1, "loss": 0.5, "ewc": 0.5}])  # during task 4
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["task", "epoch", "lr", "loss", "ce", "ewc", "kd", "monitor_accuracy"]
    assert rows[-1] == ["4", "1", "0.1", "0.5", "", "0.5", "", ""] and len(rows) == 5
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.e2e
def test_history_csv_has_a_row_after_epoch_1_of_a_2_epoch_task(make_cfg, tmp_path, monkeypatch):
    """The run stops (a non-finite loss) in epoch 2 of task 1: history.csv already holds epoch 1."""
    from experiment.errors import TrainingError
    from incremental_train_and_eval import run
    from training import task_training

    def stop_in_epoch_2(means, task, epoch, cfg, output_dir):
        if epoch == 2:
            raise TrainingError("stopped in epoch 2")

    monkeypatch.setattr(task_training, "check_finite", stop_in_epoch_2)
    with pytest.raises(TrainingError, match="stopped in epoch 2"):
        run(make_cfg(method="finetune", epochs=2, nb_cl_fg=2, nb_cl=2, output_dir=str(tmp_path / "run")))
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [(r["task"], r["epoch"]) for r in rows] == [("1", "1")]
    assert float(rows[0]["lr"]) == 0.05 and float(rows[0]["loss"]) > 0
    assert not list((tmp_path / "run").glob("*.tmp"))
