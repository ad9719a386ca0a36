"""One task's training machinery (training/task_training.py): model selection, held-out splits, divergence checks."""

import pytest
import torch

from dataloaders.image_set import DataSplits, ImageSet
from experiment.errors import TrainingError
from tiny import default_cfg
from training.task_training import ModelSelector, check_finite, check_weights, held_out_split


def test_model_selection_keeps_the_best_epoch_ties_the_earlier_and_restores_it():
    net = torch.nn.Linear(1, 1, bias=False)
    selector = ModelSelector(active=True, epochs=4)
    for epoch, (weight, accuracy) in enumerate([(1.0, 50.0), (2.0, 70.0), (3.0, 70.0), (4.0, 60.0)], start=1):
        net.weight.data.fill_(weight)
        selector.update(epoch, accuracy, net)
    assert selector.best_epoch == 2 and selector.best_accuracy == 70.0  # the tie at epoch 3 keeps epoch 2
    selector.restore(net)
    assert net.weight.item() == 2.0
    again = ModelSelector(active=True, epochs=4)
    again.load_state_dict(selector.state_dict())
    assert again.best_epoch == 2 and torch.equal(again.best_state["weight"], torch.tensor([[2.0]]))


def test_select_on_last_keeps_the_last_epoch_and_touches_nothing():
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(5.0)
    selector = ModelSelector(active=False, epochs=3)
    selector.update(1, 99.0, net)
    selector.restore(net)
    assert selector.best_epoch == 3 and net.weight.item() == 5.0


class Ctx:
    n_seen, new_classes = 3, [2]


def test_held_out_splits_are_the_seen_classes_or_the_new_ones_and_last_reads_none():
    val = ImageSet(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 2, 0]))
    test = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([3, 2, 1, 0]))
    splits = DataSplits("x", val, val, test, 4, ["a", "b", "c", "d"])
    assert held_out_split(splits, Ctx(), "val").y.tolist() == [0, 1, 2, 2, 0]
    assert held_out_split(splits, Ctx(), "val_new").y.tolist() == [2, 2]
    assert held_out_split(splits, Ctx(), "test").y.tolist() == [2, 1, 0]
    assert held_out_split(splits, Ctx(), "last") is None


def test_a_diverged_weight_or_loss_stops_in_one_line_naming_the_task_and_epoch(tmp_path):
    cfg = default_cfg(divergence_limit=100.0)
    net = torch.nn.Linear(2, 1)
    net.weight.data.fill_(99.0)
    check_weights(net, 2, 3, cfg, tmp_path)  # below the limit: nothing happens
    net.weight.data[0, 0] = 101.0
    with pytest.raises(TrainingError, match="task 2.*epoch 3") as info:
        check_weights(net, 2, 3, cfg, tmp_path)
    assert "\n" not in str(info.value)
    net.weight.data[0, 0] = float("nan")
    with pytest.raises(TrainingError):
        check_weights(net, 2, 3, default_cfg(divergence_limit=0.0), tmp_path)  # 0: only non-finite values
    with pytest.raises(TrainingError, match="task 1.*epoch 2"):
        check_finite({"loss": float("inf")}, 1, 2, cfg, tmp_path)
