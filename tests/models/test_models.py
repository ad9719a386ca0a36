"""Backbones, the incremental network and build_net from the configuration."""

import math

import pytest
import torch
from torch import nn

import models
from experiment import config
from models import build_net
from models.layers.continual_norm import ContinualNorm, convert_bn_to_cn, norm_layers
from models.network import IncrementalNet
from models.resnet import BACKBONES, BasicBlock, CCSIResNet, build_backbone, resnet18, resnet32
from tiny import default_cfg as make_cfg


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("in_channels", [1, 3])
def test_ccsi_resnet_shapes_and_parameter_count(in_channels):
    torch.manual_seed(0)
    net = CCSIResNet(in_channels=in_channels)
    out = net(torch.rand(2, in_channels, 32, 32))
    assert net.out_dim == 256 and out.shape == (2, 256)
    assert (out >= 0).all() and (out > 0).any()  # last ReLU kept
    conv = 9 * (in_channels * 16 + 16 * 16 * 2 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64) + 16 * 32 + 32 * 64
    norm = 2 * (16 + 16 * 2 + 32 * 2 + 64 * 2 + 32 + 64)
    assert _n_params(net) == conv + norm  # 77392 for RGB
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 3


def test_ccsi_resnet_geometry():
    net = CCSIResNet(in_channels=3)
    sizes = []
    net.layers.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape))
    net.pool.register_forward_hook(lambda m, inp, out: sizes.append(out.shape))
    net(torch.rand(1, 3, 32, 32))
    assert sizes == [(1, 16, 16, 16), (1, 64, 2, 2)]  # stride-2 stem, all stages stride 1, 7x7/7 pooling
    assert isinstance(net.pool, nn.AvgPool2d) and net.pool.kernel_size == 7 and net.pool.stride == 7
    big = CCSIResNet(in_channels=1, image_size=64)
    assert big.out_dim == 1024 and big(torch.rand(1, 1, 64, 64)).shape == (1, 1024)
    with pytest.raises(ValueError, match="image_size=8"):
        CCSIResNet(image_size=8)


def test_ccsi_resnet_init():
    torch.manual_seed(0)
    net = CCSIResNet()
    w = net.layers[2][0].conv2.weight  # 64 -> 64, 3x3: fan_out = 576
    assert w.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    assert w.mean().abs() < 0.002
    for bn in norm_layers(net):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_ccsi_resnet_takes_a_norm_layer():
    net = CCSIResNet(norm_layer=lambda c: nn.GroupNorm(4, c))
    assert not norm_layers(net) and sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 9
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 256)


def test_resnet32_and_resnet18_shapes():
    torch.manual_seed(0)
    r32 = resnet32(in_channels=1)
    assert r32.out_dim == 64 and r32(torch.rand(2, 1, 32, 32)).shape == (2, 64)
    assert sum(isinstance(m, BasicBlock) for m in r32.modules()) == 15
    assert sum(isinstance(m, nn.Conv2d) for m in r32.modules()) == 31 + 2  # 31 weighted 3x3 layers + 2 projections
    assert 0.46e6 < _n_params(r32) < 0.48e6
    r18 = resnet18(in_channels=3)
    assert r18.out_dim == 512 and r18(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    assert r18.conv1.stride == (1, 1) and not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    assert 11.1e6 < _n_params(r18) < 11.2e6


def test_backbone_registry():
    assert set(BACKBONES) == {"ccsi_resnet", "resnet32", "resnet18"}
    assert isinstance(build_backbone("ccsi_resnet", 1, 32), CCSIResNet)
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; known: ccsi_resnet, resnet18, resnet32"):
        build_backbone("vgg", 3, 32)


def test_cn_conversion_keeps_shapes_and_parameter_count():
    net = CCSIResNet()
    n = _n_params(net)
    convert_bn_to_cn(net, groups=4)
    assert _n_params(net) == n and len(norm_layers(net)) == 9
    assert sum(isinstance(m, ContinualNorm) for m in net.modules()) == 9
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 256)


def test_incremental_net_forward_and_growth():
    torch.manual_seed(0)
    net = IncrementalNet(CCSIResNet(in_channels=1), "cosine")
    x = torch.rand(3, 1, 32, 32)
    out = net(x)
    assert out["features"].shape == (3, 256) and out["logits"].shape == (3, 0)
    assert net.feature_dim == 256 and net.num_classes == 0
    net.expand_head(2)
    net.expand_head(3)
    assert net.head_layout() == [2, 3] and net.num_classes == 5
    net.eval()
    out = net(x)
    assert out["scores"].shape == (3, 5) and out["logits"].shape == (3, 5)
    assert torch.equal(out["features"], net.features(x))
    net.freeze_old_classes(True)
    assert not net.head.fc.fc1.weight.requires_grad and net.head.fc.fc2.weight.requires_grad
    net.imprint(torch.rand(6, 256), torch.tensor([2, 3, 4, 2, 3, 4]))
    old_norm = net.head.fc.fc1.weight.norm(dim=1).mean()
    torch.testing.assert_close(net.head.fc.fc2.weight.norm(dim=1), old_norm.expand(3))


def test_copy_frozen_is_an_independent_eval_teacher():
    torch.manual_seed(0)
    net = IncrementalNet(convert_bn_to_cn(CCSIResNet(), 4), "cosine")
    net.expand_head(2)
    net.train()
    teacher = net.copy_frozen()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert net.training and all(p.requires_grad for p in net.parameters())
    x = torch.rand(4, 3, 32, 32)
    net.eval()
    torch.testing.assert_close(teacher(x)["logits"], net(x)["logits"])
    with torch.no_grad():
        net.head.fc.weight.add_(1.0)
    assert not torch.allclose(teacher(x)["logits"], net(x)["logits"])
    assert not teacher(x)["logits"].requires_grad


def test_build_net_from_config():
    assert {"backbone", "norm", "cn_groups", "cn_momentum", "head"} <= {
        n for n, o in config.OPTIONS.items() if o.group == "model"
    }
    net = build_net(make_cfg(), in_channels=3, image_size=32)
    assert isinstance(net.backbone, CCSIResNet) and net.num_classes == 0 and net.head.kind == "cosine"
    cns = [m for m in net.modules() if isinstance(m, ContinualNorm)]
    assert len(cns) == 9 and all(m.groups == 4 and m.bn.momentum == 0.1 for m in cns)

    net = build_net(make_cfg(norm="bn", head="linear", backbone="resnet32"), in_channels=1, image_size=32)
    assert not any(isinstance(m, ContinualNorm) for m in net.modules()) and len(norm_layers(net)) == 33
    assert net.feature_dim == 64 and net.head.kind == "linear"

    net = build_net(make_cfg(cn_groups=2, cn_momentum=1.0), in_channels=1, image_size=32)
    assert all(m.groups == 2 and m.bn.momentum == 1.0 for m in net.modules() if isinstance(m, ContinualNorm))


def test_build_net_rejects_bad_values():
    with pytest.raises(config.ConfigError, match=r"cn_groups.*3.*16"):
        build_net(make_cfg(cn_groups=3), 3, 32)
    with pytest.raises(config.ConfigError, match="cn_momentum"):
        build_net(make_cfg(cn_momentum=0.0), 3, 32)
    with pytest.raises(config.ConfigError, match="cn_momentum"):
        make_cfg(cn_momentum=1.5)
    with pytest.raises(config.ConfigError, match="backbone"):
        make_cfg(backbone="vgg")


def test_head_layout_round_trip_through_state_dict():
    torch.manual_seed(0)
    cfg = make_cfg()
    net = build_net(cfg, 1, 32)
    net.expand_head(3)
    net.expand_head(2)
    net.train()(torch.rand(8, 1, 32, 32))  # move the running statistics away from their init
    state, layout = net.state_dict(), net.head_layout()
    restored = build_net(cfg, 1, 32)
    restored.set_head_layout(layout)
    restored.load_state_dict(state)
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(restored.eval()(x)["logits"], net.eval()(x)["logits"])


def test_models_package_exports():
    assert models.IncrementalNet is IncrementalNet and models.build_net is build_net
