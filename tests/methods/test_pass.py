"""PASS's rotations and prototypes by hand (the method runs end to end in test_methods.py and on shards in
tests/runtime/test_distributed.py)."""

import pytest
import torch

import models
from dataloaders.image_set import ImageSet
from experiment import config
from methods.base import TaskContext
from methods.pass_ import PASS, class_prototypes, rotate_batch


def test_rotations_are_extra_classes_image_major():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    rotated, labels = rotate_batch(x, torch.tensor([2]))
    assert labels.tolist() == [8, 9, 10, 11]
    assert torch.equal(rotated[0, 0], x[0, 0])
    assert torch.equal(rotated[1, 0], torch.tensor([[2.0, 4.0], [1.0, 3.0]]))  # 90 degrees counter-clockwise
    assert torch.equal(rotated[2, 0], torch.tensor([[4.0, 3.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 1, 2, 3), torch.tensor([0]))


def test_prototypes_are_class_means_and_spreads_are_mean_unbiased_variances():
    features = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 3.0], [1.0, 5.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    means, spreads = class_prototypes(features, labels, [0, 1])
    assert torch.equal(means, torch.tensor([[1.0, 1.0], [1.0, 4.0]]))
    assert torch.allclose(spreads, torch.tensor([2.0, 1.0]))  # class 0: vars (2, 2); class 1: vars (0, 2)
    with pytest.raises(ValueError, match="class 2 has 1"):
        class_prototypes(features, labels, [2])


def test_pass_grows_four_outputs_per_class_and_predicts_from_the_unrotated_ones(tmp_path):
    cfg = config.load_config(overrides={"dataset": "digits", "method": "pass", "device": "cpu"})
    torch.manual_seed(0)
    net = models.build_net(cfg, 1, 32)
    method = PASS(cfg, net, torch.device("cpu"))
    images = ImageSet(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    ctx = TaskContext(1, [0, 1], 0, images, images, None, torch.device("cpu"), tmp_path, torch.Generator())
    method.begin_task(ctx, cfg)
    assert net.num_classes == 8
    x = torch.rand(3, 1, 32, 32)
    method.eval()
    assert torch.equal(method.predict(x), net(x)["logits"][:, [0, 4]])
