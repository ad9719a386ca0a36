"""Class-incremental splits: task sizes, class orders, label remapping, stratified splits, config errors."""

import pytest
import torch

import dataloaders
from dataloaders.scenario import Scenario, stratified_split
from experiment.config import ConfigError
from tiny import default_cfg


def test_bloodmnist_split_2_2_2_2():
    s = Scenario.build(8, 2, 2)
    assert s.task_sizes == [2, 2, 2, 2]
    assert s.num_tasks == 4 and s.num_classes == 8
    assert s.class_order == list(range(8))
    assert [s.classes_of_task(t) for t in range(1, 5)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [s.n_old(t) for t in range(1, 5)] == [0, 2, 4, 6]
    assert [s.n_seen(t) for t in range(1, 5)] == [2, 4, 6, 8]


def test_pathmnist_split_3_2_2_2():
    s = Scenario.build(9, 3, 2)
    assert s.task_sizes == [3, 2, 2, 2]
    assert s.classes_of_task(1) == [0, 1, 2]
    assert s.classes_of_task(4) == [7, 8]


def test_last_task_takes_remainder():
    assert Scenario.build(11, 3, 3).task_sizes == [3, 3, 3, 2]  # OrganAMNIST
    assert Scenario.build(10, 3, 2).task_sizes == [3, 2, 2, 2, 1]
    assert Scenario.build(5, 5, 2).task_sizes == [5]  # one task holding every class


def test_explicit_order_and_remap():
    s = Scenario.build(4, 2, 2, class_order=[2, 0, 3, 1])
    # original label 2 is learned first (position 0), 0 second, 3 third, 1 last
    y = torch.tensor([0, 1, 2, 3, 2])
    assert s.remap(y).tolist() == [1, 3, 0, 2, 0]
    assert s.remap(y).dtype == torch.long
    assert s.remap(torch.empty(0, dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError, match=r"0\.\.3"):
        s.remap(torch.tensor([4]))


def test_shuffled_order_is_seeded_permutation():
    a = Scenario.build(10, 2, 2, shuffle=True, seed=3)
    b = Scenario.build(10, 2, 2, shuffle=True, seed=3)
    c = Scenario.build(10, 2, 2, shuffle=True, seed=4)
    assert a.class_order == b.class_order
    assert sorted(a.class_order) == list(range(10))
    assert a.class_order != list(range(10)) or c.class_order != list(range(10))
    assert a.class_order != c.class_order
    # remap inverts the order: position p holds original class class_order[p]
    assert a.remap(torch.tensor(a.class_order)).tolist() == list(range(10))


def test_build_errors():
    with pytest.raises(ConfigError, match="nb_cl_fg"):
        Scenario.build(4, 5, 2)
    with pytest.raises(ConfigError, match="permutation"):
        Scenario.build(4, 2, 2, class_order=[0, 1, 2, 2])
    with pytest.raises(ConfigError, match="permutation"):
        Scenario.build(4, 2, 2, class_order=[0, 1, 2])
    with pytest.raises(ConfigError, match="exclude"):
        Scenario.build(4, 2, 2, class_order=[0, 1, 2, 3], shuffle=True)
    with pytest.raises(ConfigError):
        Scenario.build(4, 2, 0)
    s = Scenario.build(4, 2, 2)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        s.classes_of_task(3)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        s.n_old(0)
    with pytest.raises(ValueError):
        Scenario([0, 1, 2], [2, 2])


def test_dict_round_trip():
    s = Scenario.build(9, 3, 2, shuffle=True, seed=1)
    d = s.to_dict()
    assert d == {"class_order": s.class_order, "task_sizes": [3, 2, 2, 2]}
    assert Scenario.from_dict(d) == s


def test_stratified_split_counts_and_determinism():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    parts = stratified_split(y, (0.6, 0.1, 0.3), seed=5)
    assert [len(p) for p in parts] == [36, 6, 18]
    for p, per_class in zip(parts, ([6, 12, 18], [1, 2, 3], [3, 6, 9])):
        assert torch.bincount(y[p], minlength=3).tolist() == per_class
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(60))  # disjoint, covering
    again = stratified_split(y, (0.6, 0.1, 0.3), seed=5)
    other = stratified_split(y, (0.6, 0.1, 0.3), seed=6)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not torch.equal(parts[1], other[1])


def test_build_scenario_reads_config_keys():
    cfg = default_cfg(nb_cl_fg=3, nb_cl=2, class_order=[8, 7, 6, 5, 4, 3, 2, 1, 0])
    s = dataloaders.build_scenario(cfg, 9)
    assert s.task_sizes == [3, 2, 2, 2]
    assert s.class_order == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    shuffled = dataloaders.build_scenario(default_cfg(shuffle_classes=True, seed=7), 9)
    assert shuffled.class_order == Scenario.build(9, 2, 2, shuffle=True, seed=7).class_order
    with pytest.raises(ConfigError, match="permutation"):
        dataloaders.build_scenario(default_cfg(class_order=[0, 1]), 9)
    with pytest.raises(ConfigError, match="nb_cl_fg"):
        dataloaders.build_scenario(default_cfg(nb_cl_fg=12), 11)
