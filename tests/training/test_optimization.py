"""The optimiser and lr schedule of a task (training/optimization.py) against values computed by hand."""

import math

import pytest
import torch

from tiny import default_cfg
from training.optimization import build_optimizer, build_scheduler


def one_param_optimizer(**keys):
    param = torch.nn.Parameter(torch.tensor([1.0]))
    cfg = default_cfg(**keys)
    return param, build_optimizer([{"params": [param]}], cfg), cfg


def test_sgd_step_with_weight_decay_and_momentum_by_hand():
    param, opt, _ = one_param_optimizer(lr=0.1, momentum=0.5, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        (3.0 * param).sum().backward()  # gradient 3, plus weight decay 0.01 * w
        opt.step()
    g1 = 3.0 + 0.01 * 1.0  # step 1: velocity = g1
    w1 = 1.0 - 0.1 * g1
    v2 = 0.5 * g1 + (3.0 + 0.01 * w1)  # step 2: velocity = momentum * v + g2
    assert param.item() == pytest.approx(w1 - 0.1 * v2, abs=1e-6)


def test_adam_is_chosen_and_its_first_step_is_lr_times_the_sign():
    param, opt, _ = one_param_optimizer(optimizer="adam", lr=0.01)
    assert isinstance(opt, torch.optim.Adam)
    (5.0 * param).sum().backward()
    opt.step()
    assert param.item() == pytest.approx(1.0 - 0.01, abs=1e-6)  # m/sqrt(v) = 1 on the first step


def lrs(scheduler, opt, epochs, metrics=None):
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # as the engine: the epoch's optimiser steps, then the schedule (no gradients: no change)
        scheduler.step(*([] if metrics is None else [metrics[e]]))
    return out


def test_step_cosine_and_none_schedules_by_hand():
    _, opt, cfg = one_param_optimizer(lr=1.0, scheduler="step", lr_milestones=[2, 3], lr_gamma=0.5)
    assert lrs(build_scheduler(opt, cfg), opt, 4) == pytest.approx([1.0, 1.0, 0.5, 0.25])
    _, opt, cfg = one_param_optimizer(lr=1.0, scheduler="cosine", epochs=4)
    expected = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert lrs(build_scheduler(opt, cfg), opt, 4) == pytest.approx(expected)
    _, opt, cfg = one_param_optimizer()
    assert build_scheduler(opt, cfg) is None


def test_plateau_decays_after_patience_and_the_original_watches_accuracy_in_min_mode():
    accuracy = [50.0, 60.0, 60.0, 60.0, 70.0, 80.0]
    _, opt, cfg = one_param_optimizer(lr=1.0, scheduler="plateau", lr_patience=1, lr_gamma=0.1)
    # max mode: 60 at epoch 2 improves; epochs 3-4 do not: decay after the second of them
    assert lrs(build_scheduler(opt, cfg), opt, 6, accuracy) == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])
    _, opt, cfg = one_param_optimizer(lr=1.0, scheduler="plateau_original", lr_patience=1, lr_gamma=0.1)
    # the released code's 'min' mode: rising accuracy never "improves", so the lr decays every second epoch
    assert lrs(build_scheduler(opt, cfg), opt, 6, accuracy) == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_graphs_lrs_are_float64_tensors_that_schedules_fill_and_steps_equal_float_lrs_bit_for_bit(name):
    """compile: graphs keeps each lr in a 0-d float64 tensor (a captured step reads it): a step schedule changes it
    in place, and on a CPU every step equals the float lr's exactly; SGD is foreach either way."""
    keys = dict(optimizer=name, lr=0.1, momentum=0.5 if name == "sgd" else 0.0, weight_decay=0.01)
    keys.update(scheduler="step", lr_milestones=[1], lr_gamma=0.5)
    runs = {}
    for mode in ("false", "graphs"):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(50))
        cfg = default_cfg(compile=mode, **keys)
        opt = build_optimizer([{"params": [param]}], cfg)
        scheduler, lr = build_scheduler(opt, cfg), opt.param_groups[0]["lr"]
        for _epoch in range(2):
            for step in range(3):
                opt.zero_grad()
                (param.sin() * (step + 1)).sum().backward()
                opt.step()
            scheduler.step()
        runs[mode] = (param.detach(), lr, opt)
    (plain, float_lr, plain_opt), (graphs, tensor_lr, graphs_opt) = runs["false"], runs["graphs"]
    assert isinstance(float_lr, float) and tensor_lr.dtype == torch.float64 and tensor_lr.dim() == 0
    assert graphs_opt.param_groups[0]["lr"] is tensor_lr and tensor_lr.item() == 0.05  # filled: 0.1 * 0.5
    assert torch.equal(plain, graphs)
    if name == "sgd":
        assert plain_opt.defaults["foreach"] and graphs_opt.defaults["foreach"]
    else:
        assert not graphs_opt.defaults["capturable"]  # torch allows capturable on CUDA only
