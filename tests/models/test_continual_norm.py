"""Continual Normalization: forward against a hand computation, BN -> CN conversion, norm_layers."""

import copy

import pytest
import torch
from torch import nn

from models.layers.continual_norm import ContinualNorm, convert_bn_to_cn, norm_layers
from models.resnet import CCSIResNet


def _group_norm(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = g.var(dim=2, unbiased=False, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)


def _batch_norm(x, mean, var, weight, bias, eps):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)


def _randomise(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("momentum", [0.3, 1.0])
def test_train_forward_and_running_stats_match_hand_computation(momentum):
    torch.manual_seed(0)
    eps = 1e-5
    cn = ContinualNorm(8, groups=4, momentum=momentum, eps=eps)
    _randomise(cn.bn, 1)
    run_mean0, run_var0 = cn.bn.running_mean.clone(), cn.bn.running_var.clone()
    x = torch.randn(5, 8, 3, 4) * 3 + 1
    out = cn.train()(x)

    gn = _group_norm(x, 4, eps)
    mu = gn.mean(dim=(0, 2, 3))
    var = gn.var(dim=(0, 2, 3), unbiased=False)
    expected = _batch_norm(gn, mu, var, cn.bn.weight, cn.bn.bias, eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # running stats: statistics of the GN output, unbiased variance, blended with momentum
    n = 5 * 3 * 4
    torch.testing.assert_close(cn.bn.running_mean, (1 - momentum) * run_mean0 + momentum * mu)
    torch.testing.assert_close(cn.bn.running_var, (1 - momentum) * run_var0 + momentum * var * n / (n - 1))


def test_eval_forward_uses_running_buffers():
    torch.manual_seed(0)
    cn = ContinualNorm(8, groups=2, eps=1e-3)
    _randomise(cn.bn, 2)
    x = torch.randn(3, 8, 2, 2)
    out = cn.eval()(x)
    gn = _group_norm(x, 2, 1e-3)
    expected = _batch_norm(gn, cn.bn.running_mean, cn.bn.running_var, cn.bn.weight, cn.bn.bias, 1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # eval mode leaves the buffers alone
    before = cn.bn.running_mean.clone()
    cn(x)
    assert torch.equal(before, cn.bn.running_mean)


def test_group_statistics_are_per_sample():
    """Scaling one sample does not change any output in train mode (GN removes per-sample scale/shift)."""
    torch.manual_seed(0)
    cn = ContinualNorm(4, groups=4).train()
    x = torch.randn(2, 4, 3, 3)
    y = x.clone()
    y[0] = y[0] * 5 + 2
    torch.testing.assert_close(cn(x), cn(y), rtol=1e-4, atol=1e-4)


def test_channels_not_divisible_raise():
    with pytest.raises(ValueError, match=r"num_features=6.*groups=4"):
        ContinualNorm(6, groups=4)


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=1e-3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)),
    )
    _randomise(model[1], 3)
    _randomise(model[3][1], 4)
    return model


def test_conversion_keeps_parameters_buffers_and_eps():
    model = _toy_model()
    originals = [copy.deepcopy(bn) for bn in norm_layers(model)]
    convert_bn_to_cn(model, groups=2, momentum=1.0)
    assert isinstance(model[1], ContinualNorm) and isinstance(model[3][1], ContinualNorm)
    converted = norm_layers(model)
    assert len(converted) == len(originals) == 2
    assert converted[0] is model[1].bn and converted[1] is model[3][1].bn
    for bn, old in zip(converted, originals):
        for key, value in old.state_dict().items():
            assert torch.equal(bn.state_dict()[key], value), key
        assert bn.eps == old.eps
        assert bn.momentum == 1.0
    assert model[1].groups == 2 and model[1].eps == 1e-3
    # converting again must not nest ContinualNorms
    convert_bn_to_cn(model, groups=2, momentum=1.0)
    assert len(norm_layers(model)) == 2
    assert not any(isinstance(m, ContinualNorm) for m in model[1].modules() if m is not model[1])


def test_conversion_keeps_train_eval_mode():
    model = _toy_model().eval()
    convert_bn_to_cn(model, groups=2)
    assert all(not m.training for m in model.modules())


@pytest.mark.parametrize("train", [False, True])
def test_converted_output_differs_only_by_the_group_norm(train):
    """Converted model == original model with a GroupNorm(affine=False) inserted before every BN."""
    model = _toy_model()
    reference = copy.deepcopy(model)
    reference[1] = nn.Sequential(nn.GroupNorm(2, 8, eps=1e-3, affine=False), reference[1])
    reference[3][1] = nn.Sequential(nn.GroupNorm(2, 4, eps=1e-5, affine=False), reference[3][1])
    for bn in norm_layers(reference):
        bn.momentum = 0.5
    convert_bn_to_cn(model, groups=2, momentum=0.5)
    model.train(train)
    reference.train(train)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    if train:
        for a, b in zip(norm_layers(model), norm_layers(reference)):
            torch.testing.assert_close(a.running_mean, b.running_mean)
            torch.testing.assert_close(a.running_var, b.running_var)
    # and it does differ from the unconverted model
    plain = _toy_model().train(train)
    assert not torch.allclose(model(x), plain(x), atol=1e-3)


def test_norm_layers_order_and_hooked_inputs():
    torch.manual_seed(0)
    bn_net = CCSIResNet(in_channels=3)
    bns = norm_layers(bn_net)
    assert len(bns) == 9  # stem + 3 blocks x 2 + 2 projection shortcuts
    assert bns[0] is bn_net.bn1 and bns[1] is bn_net.layers[0][0].bn1 and bns[-1] is bn_net.layers[2][0].shortcut[1]

    captured = {}
    bns[0].register_forward_pre_hook(lambda m, inp: captured.__setitem__("bn", inp[0]))
    x = torch.rand(2, 3, 32, 32)
    bn_net.eval()(x)
    torch.testing.assert_close(captured["bn"], bn_net.conv1(x))  # plain BN: the raw conv output

    cn_net = convert_bn_to_cn(copy.deepcopy(bn_net), groups=4)
    cns = norm_layers(cn_net)
    assert len(cns) == 9 and cns[0] is cn_net.bn1.bn
    cns[0].register_forward_pre_hook(lambda m, inp: captured.__setitem__("cn", inp[0]))
    cn_net.eval()(x)
    groups = captured["cn"].reshape(2, 4, -1)  # CN: the GN output, zero mean / unit variance per group
    torch.testing.assert_close(groups.mean(dim=2), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(groups.var(dim=2, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
