"""The generator inversion shared by ABD and R-DFCIL: its losses by hand, the generator's output, its training
against a tiny teacher, and its state across a checkpoint."""

import math

import pytest
import torch

from dataloaders.batches import WHOLE_BATCH, BatchShard
from experiment import config
from methods import generator_inversion as gi
from tiny import tiny_teacher


def test_feature_statistics_kl_by_hand():
    a = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)  # one channel: mean 1, biased var 1
    # KL(N(0, 1) || N(1, 1)) = 0.5 * (log 1 + (1 + 1) / 1 - 1) = 0.5
    assert math.isclose(gi.feature_statistics_kl(a, torch.zeros(1), torch.ones(1)).item(), 0.5, abs_tol=1e-6)
    assert math.isclose(gi.feature_statistics_kl(a, torch.ones(1), torch.ones(1)).item(), 0.0, abs_tol=1e-6)
    # stored var 4, mean 1: 0.5 * (log(1 / 4) + 4 - 1)
    expected = 0.5 * (math.log(0.25) + 3.0)
    assert math.isclose(gi.feature_statistics_kl(a, torch.ones(1), 4 * torch.ones(1)).item(), expected, abs_tol=1e-6)
    with pytest.raises(ValueError, match="feature_statistics_kl"):
        gi.feature_statistics_kl(torch.zeros(2, 3), torch.zeros(3), torch.ones(3))


def test_class_balance_entropy_by_hand():
    assert math.isclose(gi.class_balance_entropy(torch.zeros(4, 2)).item(), 0.0, abs_tol=1e-6)
    # batch mean softmax (0.75, 0.25): 1 - H / log 2 = 1 - 0.811278
    p = torch.tensor([[50.0, 0.0], [0.0, 0.0]])
    assert math.isclose(gi.class_balance_entropy(p).item(), 1 - 0.8112781, abs_tol=1e-5)
    with pytest.raises(ValueError, match="K >= 2"):
        gi.class_balance_entropy(torch.zeros(3, 1))


def test_smoothing_kernel_and_prior():
    k = gi.gaussian_kernel()
    g = torch.exp(-(((torch.arange(5.0) - 2) / 2) ** 2))  # the codes' exp(-((d - c) / (2 sigma))^2), sigma = 1
    assert math.isclose(k.sum().item(), 1.0, abs_tol=1e-6)
    assert math.isclose(k[2, 2].item(), 1 / g.sum().item() ** 2, abs_tol=1e-6)  # centre: 1 / 3.2934^2
    assert gi.smoothness_prior(torch.full((2, 3, 6, 6), 0.3)).item() < 1e-12, "a flat image is already smooth"
    checker = (torch.arange(36).view(6, 6) % 2).float().expand(1, 1, 6, 6)
    assert gi.smoothness_prior(checker).item() > 0.1


def test_generator_makes_images_of_the_shape_in_unit_range():
    gen = gi.Generator(z_dim=5, image_shape=(3, 10, 10), width=8)
    with torch.no_grad():
        x = gen(torch.randn(4, 5))
    assert x.shape == (4, 3, 10, 10) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_normal_rows_of_shards_equal_the_whole_batch_draw():
    whole = gi.draw_normal_rows(WHOLE_BATCH, 7, 3, torch.Generator().manual_seed(1))
    parts = [
        gi.draw_normal_rows(BatchShard(rows, 7), 4, 3, torch.Generator().manual_seed(1))
        for rows in (slice(0, 4), slice(4, 7))
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_training_lowers_the_objective_and_the_state_round_trips():
    cfg = config.load_config(
        overrides={"gen_iterations": 1, "gen_batch_size": 8, "gen_width": 8, "gen_z_dim": 4, "gen_lr": 0.01}
    )
    teacher = tiny_teacher()  # 3 classes, CN layers with running statistics, returns dict(logits)
    inversion = gi.InversionGenerator(cfg, torch.device("cpu"))
    inversion.build((1, 8, 8), seed=3)
    first = inversion.train(teacher, 3, cfg, torch.Generator().manual_seed(0))["total"]
    later = inversion.train(teacher, 3, cfg.replace(gen_iterations=30), torch.Generator().manual_seed(0))["total"]
    assert later < first
    copy = gi.InversionGenerator(cfg, torch.device("cpu"))
    copy.load_state_dict(inversion.state_dict())
    z = torch.randn(5, 4)
    x, y = inversion.sample(teacher, z, 3)
    x2, y2 = copy.sample(teacher, z, 3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (5, 1, 8, 8) and int(y.max()) < 3
    assert gi.InversionGenerator(cfg, torch.device("cpu")).state_dict() == {}
