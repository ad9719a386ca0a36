"""Feature prototypes (``ccsi_prototypes``): what is stored per class, against values computed by hand."""

import math

import torch
from torch import nn

from dataloaders.image_set import ImageSet
from methods.class_statistics import FeaturePrototypes


class PixelFeatures(nn.Module):
    """features(x) = the first two pixels of each image: values chosen by the test are the features."""

    feature_dim = 2

    def features(self, x):
        return x.flatten(1)[:, :2]


def images(pixels, labels):
    x = torch.zeros(len(pixels), 1, 2, 2)
    x.view(len(pixels), -1)[:, :2] = torch.tensor(pixels)
    return ImageSet(x, torch.tensor(labels))


def test_prototypes_are_each_class_mean_and_root_mean_variance_and_accumulate_over_tasks():
    protos = FeaturePrototypes()
    protos.add_task(PixelFeatures(), images([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0], [1.0, 3.0]], [1, 1, 0, 0]), 3)
    assert protos.labels.tolist() == [0, 1]
    assert torch.allclose(protos.means, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    # class 0: variances (0, 1) -> sqrt(0.5); class 1: (1, 4) -> sqrt(2.5)
    assert torch.allclose(protos.radius, torch.tensor([0.5, 2.5]).sqrt())
    protos.add_task(PixelFeatures(), images([[5.0, 6.0], [7.0, 6.0]], [2, 2]), 8)
    assert protos.labels.tolist() == [0, 1, 2] and torch.allclose(protos.means[2], torch.tensor([6.0, 6.0]))
    state = protos.state_dict()
    assert set(state) == {"labels", "means", "radius"} and state["means"].shape == (3, 2)  # no image kept
    again = FeaturePrototypes()
    again.load_state_dict(state)
    assert torch.equal(again.means, protos.means) and torch.equal(again.radius, protos.radius)


def test_prototype_draws_are_gaussian_around_each_class_with_its_radius():
    protos = FeaturePrototypes()
    protos.add_task(PixelFeatures(), images([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0], [10.0, 10.0]], [0, 0, 1, 1]), 4)
    features, labels = protos.sample(4000, torch.Generator().manual_seed(0))
    assert features.shape == (8000, 2) and labels.tolist() == [0] * 4000 + [1] * 4000
    assert torch.allclose(features[:4000].mean(0), torch.tensor([1.0, 2.0]), atol=0.1)
    assert torch.allclose(features[:4000].std(0), torch.full((2,), 2.5**0.5), rtol=0.05)  # radius of class 0
    assert torch.equal(features[4000:], torch.full((4000, 2), 10.0))  # class 1 has no spread


def test_drift_compensation_moves_each_prototype_by_the_drift_of_the_features_near_it():
    protos = FeaturePrototypes()
    protos.labels = torch.tensor([0, 1, 2])
    protos.means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
    protos.radius = torch.ones(3)
    before = torch.tensor([[0.0, 0.0], [10.0, 0.0]])  # the task's two images under the previous model
    after = torch.tensor([[1.0, 0.0], [10.0, 3.0]])  # and under the trained one: drifts (1, 0) and (0, 3)
    protos.compensate_drift(before, after)
    # weights exp(-d^2 / (2 D r^2)), D = 2, r = 1: class 0 sees distances^2 0 and 100 -> w = 1 / (1 + e^-25) on (1, 0)
    w = 1 / (1 + math.exp(-25))
    expected = torch.tensor([[w, 3 * (1 - w)], [10 + (1 - w), 3 * w], [5.5, 1.5]])  # class 2: halfway, equal weights
    assert torch.allclose(protos.means, expected, atol=1e-6)
    assert protos.labels.tolist() == [0, 1, 2] and torch.equal(protos.radius, torch.ones(3))  # spreads kept


def test_drift_of_a_class_without_spread_is_its_nearest_image_s():
    protos = FeaturePrototypes()
    protos.labels, protos.means, protos.radius = torch.tensor([0]), torch.tensor([[1.0, 0.0]]), torch.zeros(1)
    protos.compensate_drift(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    assert torch.equal(protos.means, torch.tensor([[1.0, 2.0]]))  # the image at its mean: drift (0, 2), no NaN
