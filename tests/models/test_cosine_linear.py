"""Cosine classifiers and the growing head: math by hand, growth, freezing, imprinting, layouts."""

import math

import pytest
import torch

from models.layers.cosine_linear import CosineLinear, IncrementalHead, SplitCosineLinear


def test_cosine_linear_matches_hand_computation():
    fc = CosineLinear(2, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
        fc.sigma.fill_(2.0)
    out = fc(torch.tensor([[3.0, 4.0], [0.0, -1.0]]))
    scores = torch.tensor([[0.6, 0.8, -7 / (5 * math.sqrt(2))], [0.0, -1.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(out["scores"], scores)
    torch.testing.assert_close(out["logits"], 2.0 * scores)


def test_cosine_linear_init():
    torch.manual_seed(0)
    fc = CosineLinear(16, 50)
    assert fc.sigma.item() == 1.0 and fc.sigma.requires_grad
    assert fc.weight.abs().max() <= 1 / math.sqrt(16)
    assert fc.weight.abs().max() > 0.2  # really spread over U(-0.25, 0.25), not zeros
    no_sigma = CosineLinear(4, 2, sigma=False)
    assert no_sigma.sigma is None and [n for n, _ in no_sigma.named_parameters()] == ["weight"]
    out = no_sigma(torch.randn(3, 4))
    assert torch.equal(out["scores"], out["logits"])


def test_split_cosine_linear_shares_one_sigma():
    fc = SplitCosineLinear(2, 1, 2)
    with torch.no_grad():
        fc.fc1.weight.copy_(torch.tensor([[0.0, 3.0]]))
        fc.fc2.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        fc.sigma.fill_(3.0)
    out = fc(torch.tensor([[4.0, 3.0]]))
    scores = torch.tensor([[0.6, 0.8, 7 / (5 * math.sqrt(2))]])  # old block first
    torch.testing.assert_close(out["scores"], scores)
    torch.testing.assert_close(out["logits"], 3.0 * scores)
    assert [n for n, _ in fc.named_parameters() if "sigma" in n] == ["sigma"]


def test_empty_head_gives_zero_columns():
    out = IncrementalHead(8)(torch.randn(3, 8))
    assert out["logits"].shape == (3, 0) and out["scores"].shape == (3, 0)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_growth_keeps_old_logits_and_sigma(kind):
    torch.manual_seed(0)
    head = IncrementalHead(8, kind)
    head.expand(3)
    assert head.layout() == [3] and head.num_classes == 3
    if kind == "cosine":
        with torch.no_grad():
            head.sigma.fill_(1.7)
    x = torch.randn(5, 8)
    first = head(x)
    weights = head.all_weights().clone()
    head.expand(2)
    assert head.layout() == [3, 2] and head.num_classes == 5
    second = head(x)
    assert second["logits"].shape == (5, 5)
    assert torch.equal(head.all_weights()[:3], weights)
    torch.testing.assert_close(second["logits"][:, :3], first["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(second["scores"][:, :3], first["scores"], rtol=0, atol=1e-6)
    head.expand(4)  # old block = 3 + 2 earlier rows, new block = 4 fresh rows
    assert head.layout() == [5, 4]
    third = head(x)
    torch.testing.assert_close(third["logits"][:, :5], second["logits"], rtol=0, atol=1e-6)
    assert not torch.allclose(third["logits"][:, 5:], third["logits"][:, :4])  # fresh rows, not copies
    if kind == "cosine":
        assert head.sigma.item() == pytest.approx(1.7)
        assert sum("sigma" in n for n, _ in head.named_parameters()) == 1
        torch.testing.assert_close(third["logits"], 1.7 * third["scores"])
    else:
        assert head.sigma is None
        assert torch.equal(third["logits"], third["scores"])
        bias = torch.cat([head.fc.fc1.bias, head.fc.fc2.bias])
        torch.testing.assert_close(third["logits"], x @ head.all_weights().T + bias)


def test_linear_growth_copies_bias():
    torch.manual_seed(0)
    head = IncrementalHead(4, "linear")
    head.expand(2)
    bias = head.fc.bias.detach().clone()
    head.expand(3)
    assert torch.equal(head.fc.fc1.bias, bias)
    assert head.fc.fc2.bias.shape == (3,)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_freeze_old_blocks_gradient_to_old_rows_only(kind):
    torch.manual_seed(0)
    head = IncrementalHead(6, kind)
    head.expand(2)
    head.freeze_old(True)  # a single block has no old rows: nothing is frozen
    head(torch.randn(4, 6))["logits"].square().sum().backward()
    assert head.fc.weight.grad is not None
    head.expand(3)
    assert not head.fc.fc1.weight.requires_grad  # the setting persists across expand
    head(torch.randn(4, 6))["logits"].square().sum().backward()
    assert head.fc.fc1.weight.grad is None
    assert head.fc.fc2.weight.grad is not None and head.fc.fc2.weight.grad.abs().sum() > 0
    if kind == "cosine":
        assert head.sigma.grad is not None and head.sigma.grad.abs() > 0
    else:
        assert head.fc.fc1.bias.grad is None and head.fc.fc2.bias.grad is not None
    head.freeze_old(False)
    head(torch.randn(4, 6))["logits"].square().sum().backward()
    assert head.fc.fc1.weight.grad is not None and head.fc.fc1.weight.grad.abs().sum() > 0


def test_imprint_sets_normalised_class_means_scaled_by_old_norm():
    head = IncrementalHead(2)
    head.expand(2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -4.0]]))  # norms 2 and 4 -> mean 3
    head.expand(2)  # new classes 2 and 3
    features = torch.tensor([[3.0, 4.0], [0.0, 5.0], [-2.0, 0.0], [7.0, 7.0]])
    labels = torch.tensor([2, 2, 3, 0])  # the class-0 sample is ignored
    head.imprint(features, labels)
    mean2 = torch.tensor([0.3, 0.9])  # mean of [0.6, 0.8] and [0, 1]
    expected = torch.stack([mean2 / mean2.norm() * 3, torch.tensor([-3.0, 0.0])])
    torch.testing.assert_close(head.fc.fc2.weight, expected)
    assert torch.equal(head.fc.fc1.weight, torch.tensor([[2.0, 0.0], [0.0, -4.0]]))  # old rows untouched
    torch.testing.assert_close(head.fc.fc2.weight.norm(dim=1), torch.tensor([3.0, 3.0]))


def test_imprint_first_task_uses_unit_norm_and_linear_zero_bias():
    head = IncrementalHead(3, "linear")
    head.expand(2)
    head.imprint(torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]]), torch.tensor([1, 0]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(head.fc.weight, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(head.fc.bias, torch.zeros(2))


def test_imprint_errors():
    head = IncrementalHead(2)
    with pytest.raises(ValueError, match="expand first"):
        head.imprint(torch.ones(1, 2), torch.zeros(1, dtype=torch.long))
    head.expand(3)
    with pytest.raises(ValueError, match=r"new classes \[1, 2\]"):
        head.imprint(torch.ones(2, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="features"):
        head.imprint(torch.ones(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_set_layout_and_load_state_dict_round_trip(kind):
    torch.manual_seed(0)
    head = IncrementalHead(5, kind)
    head.expand(3)
    head.expand(2)
    if kind == "cosine":
        with torch.no_grad():
            head.sigma.fill_(4.0)
    state = head.state_dict()
    restored = IncrementalHead(5, kind)
    restored.freeze_old(True)
    restored.set_layout(head.layout())
    assert restored.layout() == [3, 2]
    assert not restored.fc.fc1.weight.requires_grad  # freeze setting applied to rebuilt blocks
    restored.load_state_dict(state)
    x = torch.randn(4, 5)
    assert torch.equal(restored(x)["logits"], head(x)["logits"])
    single = IncrementalHead(5, kind)
    single.set_layout([4])
    assert single.layout() == [4] and single.num_classes == 4
    single.set_layout([])
    assert single.layout() == [] and single.state_dict() == {}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown head kind 'arc'"):
        IncrementalHead(4, "arc")
    head = IncrementalHead(4)
    with pytest.raises(ValueError, match="n_new >= 1, got 0"):
        head.expand(0)
    with pytest.raises(ValueError, match=r"\[1, 2, 3\]"):
        head.set_layout([1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0\]"):
        head.set_layout([0])


def test_new_blocks_follow_head_dtype():
    head = IncrementalHead(4).double()
    head.expand(2)
    head.expand(1)
    assert head.fc.fc1.weight.dtype == torch.float64 and head.fc.fc2.weight.dtype == torch.float64
    assert head(torch.randn(2, 4, dtype=torch.float64))["logits"].dtype == torch.float64
