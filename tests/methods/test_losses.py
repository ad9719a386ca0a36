"""Shared losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dataloaders.batches import WHOLE_BATCH as WHOLE
from methods import losses


def close(a: torch.Tensor, b: float | torch.Tensor, tol: float = 1e-6) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ----- class weights and weighted CE ---------------------------------------------------------------------------


def test_class_balance_weights_inverse_frequency():
    assert close(losses.class_balance_weights(torch.tensor([10, 5, 2])), torch.tensor([1.0, 2.0, 5.0]))
    # a class with no sample gets weight 0 instead of inf
    assert close(losses.class_balance_weights(torch.tensor([4, 0, 2])), torch.tensor([1.0, 0.0, 2.0]))


@pytest.mark.parametrize("counts", [torch.tensor([3, -1]), torch.tensor([0, 0]), torch.tensor([[1, 2]])])
def test_class_balance_weights_rejects_bad_counts(counts):
    with pytest.raises(ValueError):
        losses.class_balance_weights(counts)


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0], [0.0, math.log(2.0), math.log(2.0)]])
    y = torch.tensor([0, 2])
    # p(y) = 3/5 and 2/5, so nll = log(5/3) and log(5/2)
    nll = torch.tensor([math.log(5 / 3), math.log(5 / 2)])
    assert close(losses.weighted_cross_entropy(logits, y, None, WHOLE), nll.mean())
    weights = torch.tensor([1.0, 2.0, 5.0])  # w_y = 1 and 5
    expected = (1 * math.log(5 / 3) + 5 * math.log(5 / 2)) / (1 + 5)
    assert close(losses.weighted_cross_entropy(logits, y, weights, WHOLE), expected)
    # and the same through an explicit log-softmax
    log_p = logits - logits.exp().sum(dim=1, keepdim=True).log()
    manual = -(weights[y] * log_p[torch.arange(2), y]).sum() / weights[y].sum()
    assert close(losses.weighted_cross_entropy(logits, y, weights, WHOLE), manual)


def test_weighted_cross_entropy_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match="weights"):
        losses.weighted_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2), WHOLE)


# ----- LUCIR -----------------------------------------------------------------------------------------------------


def test_adaptive_lambda():
    assert losses.adaptive_lambda(5.0, 4, 2) == pytest.approx(5 * math.sqrt(2))
    assert losses.adaptive_lambda(5.0, 2, 2) == pytest.approx(5.0)
    assert losses.adaptive_lambda(5.0, 9, 4) == pytest.approx(7.5)
    with pytest.raises(ValueError, match="n_new"):
        losses.adaptive_lambda(5.0, 2, 0)


def test_less_forget_orthogonal_identical_opposite():
    ref = torch.tensor([[0.0, 1.0], [5.0, 0.0], [1.0, 1.0]])
    feats = torch.tensor([[3.0, 0.0], [2.0, 0.0], [-2.0, -2.0]], requires_grad=True)
    # 1 - cos = 1 (orthogonal), 0 (same direction, any norm), 2 (opposite); mean 1, times lamda 2
    loss = losses.less_forget(feats, ref, 2.0)
    assert close(loss, 2.0)
    assert close(losses.less_forget(feats[:1], ref[:1], 1.0), 1.0)
    assert close(losses.less_forget(feats[1:2], ref[1:2], 1.0), 0.0)
    assert close(losses.less_forget(feats[2:], ref[2:], 1.0), 2.0)
    loss.backward()
    # d(1 - cos)/df for f = (3, 0), r = (0, 1): -(r/|r||f| - cos f/|f|^2) = (0, -1/3); times lamda/B = 2/3
    assert close(feats.grad[0], torch.tensor([0.0, -2.0 / 9.0]))


def test_less_forget_does_not_backprop_into_reference():
    feats = torch.tensor([[1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[1.0, 1.0]], requires_grad=True)
    losses.less_forget(feats, ref, 1.0).backward()
    assert ref.grad is None and feats.grad is not None


def _ranking_batch() -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.tensor(
        [
            [0.5, 0.1, 0.4, 0.2],  # y=0 (old): gt 0.5, new scores 0.4, 0.2
            [0.0, 0.6, 0.5, 0.4],  # y=1 (old): gt 0.6, new scores 0.5, 0.4
            [0.9, 0.9, 0.9, 0.9],  # y=3 (new): ignored (would give 0.3)
        ],
        requires_grad=True,
    )
    return scores, torch.tensor([0, 1, 3])


def test_margin_ranking_k1():
    scores, y = _ranking_batch()
    loss = losses.margin_ranking(scores, y, n_old=2, K=1, margin=0.3, shard=WHOLE)
    # pairs: max(0, 0.3 - 0.5 + 0.4) = 0.2 and max(0, 0.3 - 0.6 + 0.5) = 0.2
    assert close(loss, 0.2)
    loss.backward()
    expected_grad = torch.tensor([[-0.5, 0.0, 0.5, 0.0], [0.0, -0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert close(scores.grad, expected_grad)


def test_margin_ranking_k2():
    scores, y = _ranking_batch()
    loss = losses.margin_ranking(scores, y, n_old=2, K=2, margin=0.3, shard=WHOLE)
    # pairs: 0.2, max(0, 0.3 - 0.5 + 0.2) = 0, 0.2, max(0, 0.3 - 0.6 + 0.4) = 0.1 -> 0.5 / 4
    assert close(loss, 0.125)
    # same as torch's MarginRankingLoss on the 4 (gt, new) pairs
    gt = torch.tensor([0.5, 0.5, 0.6, 0.6])
    new = torch.tensor([0.4, 0.2, 0.5, 0.4])
    assert close(loss, torch.nn.MarginRankingLoss(margin=0.3)(gt, new, torch.ones(4)))


def test_margin_ranking_without_old_samples_is_differentiable_zero():
    scores, _ = _ranking_batch()
    loss = losses.margin_ranking(scores, torch.tensor([2, 3, 3]), n_old=2, K=1, margin=0.3, shard=WHOLE)
    assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros_like(scores))


def test_margin_ranking_rejects_k_above_new_classes():
    scores, y = _ranking_batch()
    with pytest.raises(ValueError, match="K=3"):
        losses.margin_ranking(scores, y, n_old=2, K=3, margin=0.3, shard=WHOLE)


# ----- knowledge distillation ------------------------------------------------------------------------------------


def test_kd_loss_by_hand():
    teacher = torch.tensor([[math.log(3.0), 0.0], [2 * math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 2 * math.log(2.0)]], requires_grad=True)
    # T=1, row 0: p_t = (3/4, 1/4), p_s = (1/2, 1/2) -> log 2
    assert close(losses.kd_loss(student[:1], teacher[:1], 1.0), math.log(2.0))
    # T=2, row 1: p_t = (3/4, 1/4), p_s = (1/3, 2/3) -> 3/4 log 3 + 1/4 log 3/2
    row1 = 0.75 * math.log(3.0) + 0.25 * math.log(1.5)
    # T=2, row 0: p_t = softmax(log(3)/2, 0) = (sqrt3, 1) / (sqrt3 + 1), p_s uniform -> log 2
    loss = losses.kd_loss(student, teacher, 2.0)
    assert close(loss, (math.log(2.0) + row1) / 2)
    # it is batchmean KL(p_t || p_s) plus the teacher's entropy (no T^2 factor)
    p_t = torch.softmax(teacher / 2, dim=1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / 2, dim=1), p_t, reduction="batchmean")
    assert close(loss, kl + (-(p_t * p_t.log()).sum(dim=1)).mean())
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_loss(student, teacher, 0.0)


# ----- CCSI intra-domain contrastive ------------------------------------------------------------------------------


def _idc_loss(t_rows: torch.Tensor, s_rows: torch.Tensor, tau: float) -> float:
    """-log(trace / sum) of exp(T S^T / tau) for rows already L2-normalised (or zero)."""
    m = torch.exp(t_rows @ s_rows.t() / tau)
    return float(-torch.log(torch.diagonal(m).sum() / m.sum()))


STEP1_SOURCE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.5]])  # labels 0, 1, 1
STEP1_LABELS = torch.tensor([0, 1, 1])
STEP1_TARGET = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # pseudo-labels 1, 0
STEP2_SOURCE = torch.tensor([[0.0, 1.0]])  # label 0; class 1 absent
STEP2_LABELS = torch.tensor([0])
STEP2_TARGET = torch.tensor([[0.0, 1.0]])  # pseudo-label 1; class 0 absent


def test_idc_first_step_by_hand():
    idc = losses.IntraDomainContrastive(ro=0.9, temperature=0.5)
    loss = idc(STEP1_SOURCE, STEP1_LABELS, STEP1_TARGET, WHOLE)
    # S = ro * class means = 0.9 * [[1, 0], [0, 0.75]]; T = 0.9 * [[0.8, 0.6], [0.6, 0.8]]
    assert close(idc.source_centroids, 0.9 * torch.tensor([[1.0, 0.0], [0.0, 0.75]]))
    assert close(idc.target_centroids, 0.9 * torch.tensor([[0.8, 0.6], [0.6, 0.8]]))
    # normalised: S = I, T S^T = [[0.8, 0.6], [0.6, 0.8]] -> L = -log(2 e^1.6 / (2 e^1.6 + 2 e^1.2))
    assert close(loss, math.log(1 + math.exp(-0.4)))


def test_idc_second_step_ema_by_hand():
    idc = losses.IntraDomainContrastive(ro=0.5, temperature=0.5)
    idc(STEP1_SOURCE, STEP1_LABELS, STEP1_TARGET, WHOLE)
    loss = idc(STEP2_SOURCE, STEP2_LABELS, STEP2_TARGET, WHOLE)
    # S = 0.5 * 0.5 * [[1, 0], [0, 0.75]] + 0.5 * [[0, 1], [0, 0]]  (absent class 1 decays)
    s = torch.tensor([[0.25, 0.5], [0.0, 0.1875]])
    # T = 0.5 * 0.5 * [[0.8, 0.6], [0.6, 0.8]] + 0.5 * [[0, 0], [0, 1]]  (absent class 0 decays)
    t = torch.tensor([[0.2, 0.15], [0.15, 0.7]])
    assert close(idc.source_centroids, s)
    assert close(idc.target_centroids, t)
    s_rows = torch.tensor([[1.0, 2.0], [0.0, 5**0.5]]) / 5**0.5
    t_rows = torch.tensor([[0.8, 0.6], [0.15 / 0.5125**0.5, 0.7 / 0.5125**0.5]])
    assert close(loss, _idc_loss(t_rows, s_rows, 0.5))


def test_idc_reset_and_zero_rows_of_unseen_classes():
    idc = losses.IntraDomainContrastive(ro=0.5, temperature=0.5)
    idc(STEP1_SOURCE, STEP1_LABELS, STEP1_TARGET, WHOLE)
    idc.reset()
    assert idc.source_centroids is None and idc.target_centroids is None
    source = STEP2_SOURCE.clone().requires_grad_(True)
    target = STEP2_TARGET.clone().requires_grad_(True)
    loss = idc(source, STEP2_LABELS, target, WHOLE)
    # fresh memory: S0 = (0, 1), S1 = 0; T0 = 0, T1 = (0, 1). T S^T / tau = [[0, 0], [2, 0]]:
    # the zero rows still enter as exp(0) = 1, so L = -log(2 / (3 + e^2))
    assert close(loss, math.log((3 + math.exp(2.0)) / 2))
    loss.backward()
    assert torch.isfinite(source.grad).all() and torch.isfinite(target.grad).all()


def test_idc_gradient_reaches_current_batch_only():
    idc = losses.IntraDomainContrastive(ro=0.9, temperature=1.0)
    first = STEP1_SOURCE.clone().requires_grad_(True)
    idc(first, STEP1_LABELS, STEP1_TARGET, WHOLE)
    source = torch.tensor([[0.9, 0.3], [0.2, 0.7], [0.4, 0.1]], requires_grad=True)
    target = torch.tensor([[0.3, 0.6], [0.7, 0.2]], requires_grad=True)
    loss = idc(source, torch.tensor([0, 1, 0]), target, WHOLE)
    loss.backward()
    assert first.grad is None  # the memory of past steps is detached
    assert source.grad.abs().sum() > 0 and target.grad.abs().sum() > 0
    assert not idc.source_centroids.requires_grad and not idc.target_centroids.requires_grad


def test_idc_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ro"):
        losses.IntraDomainContrastive(ro=0.0, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.IntraDomainContrastive(ro=0.9, temperature=0.0)
    idc = losses.IntraDomainContrastive(ro=0.9, temperature=1.0)
    idc(STEP1_SOURCE, STEP1_LABELS, STEP1_TARGET, WHOLE)
    with pytest.raises(ValueError, match="reset"):
        idc(torch.zeros(2, 3), torch.tensor([0, 2]), torch.zeros(2, 3), WHOLE)


def test_masked_mean_averages_the_selected_entries_and_is_zero_without_any():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    mean = losses.masked_mean(values, torch.tensor([True, False, True, False]), WHOLE)
    assert mean.item() == pytest.approx(2.5)  # (1 + 4) / 2
    mean.backward()
    assert values.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    empty = losses.masked_mean(values, torch.zeros(4, dtype=torch.bool), WHOLE)
    assert empty.item() == 0.0 and empty.requires_grad


# ----- data-free distillation: ABD, R-DFCIL, PASS ----------------------------------------------------------------


def test_weighted_feature_kd_goes_through_the_old_head_weights():
    features, old = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    weight = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # 2 old classes
    # row 0: W (f - f*) = (1, 2): 1 + 4 = 5; row 1: 0; mean over rows 2.5, / n_old 2 = 1.25
    assert close(losses.weighted_feature_kd(features, old, weight), 1.25)
    assert close(losses.weighted_feature_kd(old, old, weight), 0.0)
    features.requires_grad_(True)
    losses.weighted_feature_kd(features, old, weight).backward()
    # d/df0 of (f0 . w1)^2 + (f0 . w2)^2 over 2 rows and 2 classes: (2 * 1 * w1 + 2 * 2 * w2) / 4 = (2.5, 0.5)
    assert close(features.grad, torch.tensor([[2.5, 0.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="weighted_feature_kd"):
        losses.weighted_feature_kd(features, old, torch.ones(2, 3))


def test_rkd_angle_on_three_points_by_hand():
    right = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # a right angle at point 0
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # collinear
    assert close(losses.rkd_angle(right, right.clone(), WHOLE), 0.0)
    # |cos differences| per anchor i: i=0: 1 + 1; i=1: 2 * (1 + 1/sqrt 2); i=2: 2 * (1 - 1/sqrt 2); total 6 over 27
    assert close(losses.rkd_angle(right, line, WHOLE), 6.0 / 27.0)
    assert close(losses.rkd_angle(2 * right + 1, right, WHOLE), 0.0), "angles ignore scale and shift"


def test_feature_distance_is_the_norm_of_the_whole_difference():
    assert close(losses.feature_distance(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), WHOLE), 5.0)
    assert close(losses.feature_distance(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.zeros(2, 2), WHOLE), 5.0)
    f = torch.zeros(2, 2, requires_grad=True)
    losses.feature_distance(f, torch.zeros(2, 2), WHOLE).backward()
    assert torch.equal(f.grad, torch.zeros(2, 2)), "no NaN gradient where student and teacher agree"


def test_gather_rows_of_a_whole_batch_is_the_batch():
    x = torch.randn(3, 2)
    assert losses.gather_rows(x, WHOLE) is x


# ----- padded batches (compile: graphs): rows where valid is False do not count ----------------------------------


def test_padding_rows_leave_the_weighted_ce_distillation_and_margin_by_hand():
    """Rows 0-1 are real, row 2 pads (any values). CE with weights (2, 1): both real rows are class 0, so the
    weighted mean is (ln 2 + ln(4/3)) / 2; plain CE the same mean. Less-forget: cosines 1 and 0 -> lamda * 1/2.
    Margin (n_old 1, K 1, m 0.5): only real row 0 is old: max(0, 0.5 - 0.2 + 0.4) = 0.7."""
    valid = torch.tensor([True, True, False])
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 9.0]])
    y = torch.tensor([0, 0, 0])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert close(losses.weighted_cross_entropy(logits, y, torch.tensor([2.0, 1.0]), WHOLE, valid), expected)
    assert close(losses.weighted_cross_entropy(logits, y, None, WHOLE, valid), expected)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    ref = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert close(losses.less_forget(f, ref, 0.8, valid), 0.8 * 0.5)
    scores = torch.tensor([[0.2, 0.4], [0.9, 0.0], [0.0, 1.0]])
    assert close(losses.margin_ranking(scores, torch.tensor([0, 1, 0]), 1, 1, 0.5, WHOLE, valid), 0.7)


def test_padding_rows_leave_the_idc_centroids_and_an_all_true_mask_changes_nothing():
    """IdC of a batch padded by repeating its rows (source and target alike) equals IdC of the real rows, over two
    steps (the centroids carry over); a mask of only real rows equals no mask."""
    torch.manual_seed(0)
    src, tgt, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    rep, valid = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), torch.arange(8) < 5
    plain, padded, all_true = (losses.IntraDomainContrastive(0.9, 0.5) for _ in range(3))
    for step in range(2):
        s, t = src + step, tgt - step
        want = plain(s, y, t, WHOLE)
        assert close(padded(s[rep], y[rep], t[rep], WHOLE, valid), want, 1e-5)
        assert close(all_true(s, y, t, WHOLE, torch.ones(5, dtype=torch.bool)), want, 1e-5)
