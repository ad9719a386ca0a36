"""Loss functions shared by several methods (CCSI, LUCIR, LwF, iCaRL, WA, ...).

Pure functions: tensors in, a scalar tensor out; the calling method applies the weights from its config.
The one stateful loss, :class:`IntraDomainContrastive`, keeps per-epoch EMA class centroids (CCSI).
A loss that is not a mean over samples (a class-weighted mean, a mean over some rows, class centroids) takes
the batch's ``BatchShard`` and forms its sums over the global batch with ``shard.total`` (under torchrun each
rank holds part of the batch); it cannot be called without one. Per-sample means need nothing. Losses a padded
batch reaches (``Batch.valid``, ``compile: graphs``) take ``valid`` (B,) bool and leave the padding rows out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dataloaders.batches import WHOLE_BATCH, BatchShard
from experiment.config import Option, register_options

__all__ = [
    "IntraDomainContrastive",
    "adaptive_lambda",
    "class_balance_weights",
    "feature_distance",
    "gather_rows",
    "kd_loss",
    "less_forget",
    "margin_ranking",
    "rkd_angle",
    "weighted_cross_entropy",
    "weighted_feature_kd",
]

register_options(
    "distillation",
    [
        Option(
            "kd_temperature", "float", 2.0, "softmax temperature of logit distillation (LwF, iCaRL, WA: 2)", min=1e-6
        ),
    ],
    scope="task",
)


def _check_labels(logits: Tensor, y: Tensor, name: str) -> None:
    if logits.dim() != 2 or y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{name}: expected scores (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(y.shape)}"
        )


# ----- class-balanced cross-entropy ----------------------------------------------------------------------------


def class_balance_weights(counts: Tensor) -> Tensor:
    """Inverse-frequency class weights w_c = n_max / n_c (CCSI's class-weighted CE), shape (C,) -> (C,).

    A class with no training sample gets weight 0 (the original's 1/0 = inf): it is never a target, so its
    weight is never used by the CE, and 0 keeps the weight vector finite.
    """
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor (C,), got shape {tuple(counts.shape)}")
    counts = counts.to(torch.float64)
    if bool((counts < 0).any()):
        raise ValueError(f"class counts must be >= 0, got {counts.tolist()}")
    n_max = counts.max()
    if n_max <= 0:
        raise ValueError(f"class counts are all zero: {counts.tolist()}")
    weights = torch.where(counts > 0, n_max / counts.clamp(min=1e-12), torch.zeros_like(counts))  # (C,)
    return weights.to(torch.get_default_dtype())


def masked_mean(values: Tensor, mask: Tensor, shard: BatchShard) -> Tensor:
    """Mean of ``values`` where ``mask`` (same shape) is true, over the global batch of ``shard``, and a zero
    that keeps the graph when no entry is selected."""
    weights = mask.to(values.dtype)
    total, count = shard.total(torch.stack([(values * weights).sum(), weights.sum()]))
    return total / count.clamp(min=1)


def weighted_cross_entropy(
    logits: Tensor, y: Tensor, weights: Tensor | None, shard: BatchShard, valid: Tensor | None = None
) -> Tensor:
    """Class-weighted CE, logits (B, C), labels (B,), weights (C,) or None (plain CE), over the global batch's rows
    where ``valid`` (B,) (all when None).

    Reduction as ``F.cross_entropy(weight=...)``: sum_i w_{y_i} * nll_i / sum_i w_{y_i} (a weighted mean).
    """
    _check_labels(logits, y, "weighted_cross_entropy")
    if weights is not None and weights.shape != (logits.shape[1],):
        raise ValueError(f"weights must have shape ({logits.shape[1]},), got {tuple(weights.shape)}")
    if weights is not None:
        weights = weights.to(device=logits.device, dtype=logits.dtype)
    if valid is None and (weights is None or shard.whole):
        return F.cross_entropy(logits, y, weight=weights)
    nll = F.cross_entropy(logits, y, reduction="none")  # (B,)
    w = torch.ones_like(nll) if weights is None else weights[y]  # (B,)
    if valid is not None:
        w = w * valid
    num, den = shard.total(torch.stack([(w * nll).sum(), w.sum()]))  # over the global batch
    return num / den


# ----- LUCIR (Hou et al., CVPR 2019) ---------------------------------------------------------------------------


def adaptive_lambda(lamda: float, n_old: int, n_new: int) -> float:
    """LUCIR's adaptive less-forget weight lambda_t = lamda * sqrt(n_old / n_new) (Hou et al. 2019)."""
    if n_old < 0 or n_new <= 0:
        raise ValueError(f"adaptive_lambda needs n_old >= 0 and n_new > 0, got n_old={n_old}, n_new={n_new}")
    return float(lamda) * math.sqrt(n_old / n_new)


def less_forget(
    features: Tensor,
    ref_features: Tensor,
    lamda_t: float,
    valid: Tensor | None = None,
    shard: BatchShard = WHOLE_BATCH,
) -> Tensor:
    """LUCIR less-forget constraint: lamda_t * mean_i (1 - cos(f_i, f*_i)) (Hou et al. 2019).

    features (B, D) from the current model, ref_features (B, D) from the frozen previous model (detached here);
    every sample counts, as ``CosineEmbeddingLoss`` with target 1 in LUCIR's code; with ``valid`` (B,) bool, the
    mean is over those rows of the global batch of ``shard``.
    """
    if features.dim() != 2 or features.shape != ref_features.shape:
        raise ValueError(
            f"less_forget: expected two (B, D) tensors, got {tuple(features.shape)} and {tuple(ref_features.shape)}"
        )
    cos = F.cosine_similarity(features, ref_features.detach(), dim=1)  # (B,)
    if valid is not None:
        return lamda_t * masked_mean(1.0 - cos, valid, shard)
    return lamda_t * (1.0 - cos).mean()


def margin_ranking(
    scores: Tensor, y: Tensor, n_old: int, K: int, margin: float, shard: BatchShard, valid: Tensor | None = None
) -> Tensor:
    """LUCIR inter-class separation: mean over (old-class sample, top-K new class) pairs of
    max(0, m - <theta_y, f> + <theta_k, f>) (Hou et al. 2019), on pre-sigma cosines ``scores`` (B, n_seen).

    Samples with y >= n_old (or not ``valid``) do not count; with no old-class sample the result is a zero that
    keeps the graph.
    """
    _check_labels(scores, y, "margin_ranking")
    n_new = scores.shape[1] - n_old
    if n_old < 0 or n_new < 1:
        raise ValueError(f"margin_ranking: n_old={n_old} leaves no new class among {scores.shape[1]} columns")
    if not 1 <= K <= n_new:
        raise ValueError(f"margin_ranking: K={K} must be in [1, {n_new}] (the number of new classes)")
    gt = scores.gather(1, y.view(-1, 1))  # (B, 1)
    top_new = scores[:, n_old:].topk(K, dim=1).values  # (B, K)
    hinge = (margin - gt + top_new).clamp(min=0)  # (B, K)
    old = y < n_old if valid is None else (y < n_old) & valid  # (B,)
    hard = old.view(-1, 1).expand_as(hinge)  # (B, K): pairs of old-class samples
    return masked_mean(hinge, hard, shard)


# ----- knowledge distillation ----------------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Hinton KD as soft-target cross-entropy: -mean_i sum_c softmax(z_t/T)_c * log_softmax(z_s/T)_c, (B, C) each.

    This is the form of LwF (Li & Hoiem 2016) and PyCIL's ``_KD_loss``, whose loss weights our configs
    reuse: no T^2 factor; it equals batchmean KL(p_t || p_s) plus the teacher's entropy, so the gradient is the KL's.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: expected two (B, C) tensors, got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if T <= 0:
        raise ValueError(f"kd_loss: temperature T must be > 0, got {T}")
    log_p_student = F.log_softmax(student_logits / T, dim=1)  # (B, C)
    p_teacher = F.softmax(teacher_logits.detach() / T, dim=1)  # (B, C)
    return -(p_teacher * log_p_student).sum(dim=1).mean()


# ----- CCSI intra-domain contrastive loss ----------------------------------------------------------------------


def _class_means(
    scores: Tensor, labels: Tensor, n_classes: int, shard: BatchShard, valid: Tensor | None = None
) -> Tensor:
    """Per-class mean of score rows (B, C) -> (n_classes, C) over the global batch's rows (where ``valid``); a class
    absent gets a zero row."""
    one_hot = F.one_hot(labels, n_classes).to(scores.dtype)  # (B, n_classes)
    if valid is not None:
        one_hot = one_hot * valid[:, None]
    sums = shard.total(one_hot.t() @ scores)  # (n_classes, C)
    counts = shard.total(one_hot.sum(dim=0)).clamp(min=1).unsqueeze(1)  # (n_classes, 1)
    return sums / counts


class IntraDomainContrastive:
    """CCSI intra-domain contrastive loss (Ayromlou et al. 2024): L = -log(tr(M) / sum(M)), M = exp(T S^T / tau).

    S and T are (C, C) class centroids of pre-sigma cosine score vectors of the labelled batch (true labels) and of
    an unlabelled target batch (argmax pseudo-labels), kept as per-epoch EMAs: c <- (1 - ro) * c.detach() + ro * mean.
    As in the authors' code: memories start at zero on ``reset()``; a class absent from a batch gets a zero mean
    (its centroid decays by 1 - ro); rows are divided by (norm + 1e-10), so a never-seen class is a zero row that
    still enters M as exp(0) = 1 entries; all C classes enter; only the current batch carries gradient.
    """

    def __init__(self, ro: float, temperature: float) -> None:
        if not 0.0 < ro <= 1.0:
            raise ValueError(f"IntraDomainContrastive: ro must be in (0, 1], got {ro}")
        if temperature <= 0:
            raise ValueError(f"IntraDomainContrastive: temperature must be > 0, got {temperature}")
        self.ro = ro
        self.temperature = temperature
        self.source_centroids: Tensor | None = None  # (C, C), detached memory of S
        self.target_centroids: Tensor | None = None  # (C, C), detached memory of T

    def reset(self) -> None:
        """Forget the centroids (the authors reset them at the start of every epoch)."""
        self.source_centroids = None
        self.target_centroids = None

    def __call__(
        self,
        source_scores: Tensor,
        source_labels: Tensor,
        target_scores: Tensor,
        shard: BatchShard,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Loss for one step: source_scores (B, C) with labels (B,), target_scores (B2, C) unlabelled; the
        centroids are over the global batch of ``shard`` (the target rows are sharded like the source rows) and,
        with ``valid`` (B,) bool, over those rows of both (a padded batch's target rows are padded alike)."""
        _check_labels(source_scores, source_labels, "IntraDomainContrastive")
        n_classes = source_scores.shape[1]
        if target_scores.dim() != 2 or target_scores.shape[1] != n_classes:
            raise ValueError(
                f"IntraDomainContrastive: target_scores must be (B2, {n_classes}), got {tuple(target_scores.shape)}"
            )
        if self.source_centroids is not None and self.source_centroids.shape[0] != n_classes:
            raise ValueError(
                f"IntraDomainContrastive: {n_classes} classes but the memory holds "
                f"{self.source_centroids.shape[0]}; call reset() when the head grows"
            )
        # sigma > 0 scales every logit alike, so argmax of pre-sigma scores = argmax of logits (the original's).
        pseudo_labels = target_scores.detach().argmax(dim=1)  # (B2,)
        s_means = _class_means(source_scores, source_labels, n_classes, shard, valid)
        t_means = _class_means(target_scores, pseudo_labels, n_classes, shard, valid)
        s_new, t_new = self._update(self.source_centroids, s_means), self._update(self.target_centroids, t_means)
        self.source_centroids, self.target_centroids = s_new.detach(), t_new.detach()
        s_norm = s_new / (s_new.norm(dim=1, keepdim=True) + 1e-10)  # (C, C)
        t_norm = t_new / (t_new.norm(dim=1, keepdim=True) + 1e-10)  # (C, C)
        m = torch.exp(t_norm @ s_norm.t() / self.temperature)  # (C, C)
        return torch.log(m.sum()) - torch.log(torch.diagonal(m).sum())

    def _update(self, memory: Tensor | None, batch_means: Tensor) -> Tensor:
        if memory is None:  # zero memory after reset: the first step gives ro * batch means
            return self.ro * batch_means
        return (1.0 - self.ro) * memory + self.ro * batch_means


# ----- data-free distillation (ABD, R-DFCIL, PASS) ---------------------------------------------------------------


def gather_rows(x: Tensor, shard: BatchShard) -> Tensor:
    """The global batch's rows (N, ...) from this process's rows ``x`` (n, ...), differentiable (``x`` itself for a
    whole batch): for a loss that couples every pair of rows (relational distillation)."""
    if shard.whole:
        return x
    assert shard.rows is not None
    full = x.new_zeros(shard.size, *x.shape[1:])
    full[shard.rows] = x
    return shard.total(full)


def weighted_feature_kd(features: Tensor, old_features: Tensor, old_weight: Tensor) -> Tensor:
    """ABD's importance-weighted feature distillation: mean_i ||W_old (f_i - f*_i)||^2 / n_old, for features and the
    frozen previous model's features (B, D) and the previous linear head's weight W_old (n_old, D) (Smith et al.
    2021; their code: MSE of the previous head's logits on both features, summed over classes, / n_old)."""
    if features.dim() != 2 or features.shape != old_features.shape or old_weight.shape[1:] != features.shape[1:]:
        raise ValueError(
            f"weighted_feature_kd: expected (B, D), (B, D), (n_old, D), got {tuple(features.shape)}, "
            f"{tuple(old_features.shape)}, {tuple(old_weight.shape)}"
        )
    diff = (features - old_features.detach()) @ old_weight.detach().t()  # (B, n_old)
    return diff.pow(2).sum(dim=1).mean() / old_weight.shape[0]


def rkd_angle(student: Tensor, teacher: Tensor, shard: BatchShard) -> Tensor:
    """Relational (angle-wise) distillation of Park et al. 2019 as in R-DFCIL's code: for every triple (i, j, k) of
    the global batch, the cosine of the angle between e_j - e_i and e_k - e_i; L1 between the student's (N, P) and the
    teacher's (N, P) cosines, mean over the N^3 triples (i = j gives a zero difference: cosine 0). The teacher side
    is not detached: R-DFCIL trains a projection of the frozen teacher's features too."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"rkd_angle: expected two (N, P) tensors, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    s, t = gather_rows(student, shard), gather_rows(teacher, shard)

    def angles(e: Tensor) -> Tensor:
        d = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (N, N, P): row i holds e_j - e_i
        return torch.bmm(d, d.transpose(1, 2))  # (N, N, N)

    return F.l1_loss(angles(s), angles(t))


def feature_distance(features: Tensor, old_features: Tensor, shard: BatchShard) -> Tensor:
    """PASS's feature distillation ``torch.dist(f, f_old, 2)``: the L2 norm of the whole global batch's difference
    (B, D), not a mean over samples (Zhu et al. 2021's code); zero gradient where the difference is zero."""
    if features.shape != old_features.shape:
        raise ValueError(f"feature_distance: shapes differ, {tuple(features.shape)} and {tuple(old_features.shape)}")
    squares = shard.total((features - old_features.detach()).pow(2).sum())
    return torch.sqrt(squares.clamp(min=1e-12))
