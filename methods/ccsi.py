"""CCSI: Continual Class-Specific Impression for data-free class-incremental learning.

Ayromlou, Tsang, Abolmaesumi, Li (arXiv 2406.05631; MICCAI 2022 "Class Impression"). No real image
of an old class is kept: after each task the method stores one mean image and the CN moments per
class; before the next task the frozen model turns those into synthetic "impressions" of every old
class, which are mixed with the new classes' real images (fraction ``rs_ratio`` synthetic).
Task 1: class-weighted CE. Tasks >= 2: LUCIR less-forget distillation (adaptive lambda) +
class-weighted cosine CE + margin ranking on old-class samples + intra-domain contrastive (IdC).

This module also holds the per-task synthesis of old classes (``synthesize_classes``, ``replay_impressions``:
draws, initial images, moment targets, ranks, the impression grid, logging), which DeepInversion shares.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import continual_class_specific_impression as synthesis
from dataloaders.batches import Batch, BatchLoader, RowDraws
from dataloaders.image_set import ImageSet, as_float
from experiment.config import Config, ConfigError, Option, register_options
from methods import losses
from methods.base import Method, TaskContext, extract_features
from methods.class_statistics import ClassMemory, FeaturePrototypes
from methods.lucir import less_forget_weight, prepare_cosine_head
from methods.registry import register_method
from methods.teacher_cache import TeacherCache
from reporting.plots import plot_impressions
from runtime import distributed
from runtime.data_access import DataAccess
from synthesis_losses import bn_layers

log = logging.getLogger(__name__)

register_options(
    "ccsi",
    [
        Option("da_coef", "float", 1.0, "IdC (intra-domain contrastive) weight; 0 disables it", min=0.0),
        Option(
            "ro",
            "float",
            0.9,
            "IdC: EMA weight of the current batch's class centroids",
            min=0.0,
            max=1.0,
            min_exclusive=True,
        ),
        Option("temprature", "float", 0.5, "IdC: softmax temperature tau (original key spelling)", min=1e-6),
        Option(
            "idc_source",
            "str",
            "val",
            "IdC unlabelled batches: test (the released code: test images of all seen classes), val (val images of "
            "all seen classes), or train (the task's new-class training images: data-free)",
            choices=("test", "val", "train"),
        ),
        Option(
            "class_stats_update",
            "str",
            "frozen",
            "stored CN moments of old classes: frozen = as computed when the class was learned (the released code); "
            "refresh = after each task, re-estimated from that task's impressions of the class through the trained "
            "model (no real image; matters with class_stats per_class only)",
            choices=("frozen", "refresh"),
        ),
        Option(
            "rs_ratio",
            "float",
            0.66,
            "fraction of synthetic samples in training batches (CCSI: 0.66)",
            min=0.0,
            max=0.99,
        ),
        Option(
            "ccsi_local_ce",
            "bool",
            False,
            "local CE (after ABD, Smith et al. 2021): the network learns from real rows' CE over the new classes' "
            "outputs and impressions' CE over the old classes' outputs only (no real-vs-synthetic boundary to learn); "
            "the head alone learns the CE over all seen classes on detached features (class-weighted)",
        ),
        Option(
            "ccsi_head_refit_epochs",
            "int",
            0,
            "after each task >= 2, epochs of a class-balanced refit of the head (R-DFCIL's head refit) on frozen "
            "features of the task's real images and its impressions (w_c = n_max / n_c); 0 = off (the paper)",
            min=0,
        ),
        Option("ccsi_head_refit_lr", "float", 0.01, "SGD learning rate of the head refit", min=0.0, min_exclusive=True),
        Option(
            "ccsi_prototypes",
            "bool",
            False,
            "keep each class's feature prototype (PASS: the mean and spread of its real training images' features, "
            "taken at the end of its own task); the head refit then draws the old classes' rows around them "
            "(mean + radius * N(0, I)) instead of taking the impressions' features",
            scope="experiment",
        ),
        Option(
            "ccsi_prototype_drift",
            "bool",
            False,
            "with ccsi_prototypes: after each task >= 2, move the old prototypes by the drift of the task's own "
            "images' features between the previous and the trained model, weighted by nearness (SDC, Yu et al. 2020), "
            "before the head refit draws around them",
            scope="experiment",
        ),
        Option(
            "class_weights",
            "str",
            "counts",
            "CE class weights: counts = CCSI's n_max / n_c over the real + synthetic sets (the paper); sampled = "
            "inverse of each class's expected share of the drawn rows (rs_ratio applied: every class weighs the "
            "same in a batch); none = plain CE",
            choices=("counts", "sampled", "none"),
        ),
    ],
    scope="task",
)


# ----- synthesis of old classes, shared with DeepInversion ----------------------------------------


def synthesize_classes(
    teacher: nn.Module,
    n_classes: int,
    image_shape: tuple[int, ...],
    cfg: Config,
    seed: int,
    device: torch.device | str,
    memory: ClassMemory | None = None,
    groups: Sequence[int] | None = None,
    group_chunk: int | None = None,
    progress: bool = False,
) -> synthesis.SynthesisResult:
    """Impressions of classes 0..n_classes-1 (batches ``groups``, default all ``nb_generation``): per-batch seeded
    draws, initial images (class means from ``memory`` or noise, ``syn_init``), moment targets (``class_stats``:
    the teacher's running statistics, or the class mixture of ``memory``'s moments), then ``synthesize``."""
    device = torch.device(device)
    group_ids = list(range(cfg.nb_generation)) if groups is None else [int(g) for g in groups]
    draws = synthesis.draw_batches(seed, group_ids, n_classes, tuple(image_shape), cfg)
    labels = draws.labels.to(device)
    mean_images = None
    if cfg.syn_init == "mean" or cfg.class_stats == "per_class":
        if memory is None or memory.mean_images is None:
            raise ValueError("class memory is empty: add the classes' mean images and statistics first")
        rows = memory.rows(torch.arange(n_classes))
        mean_images = memory.mean_images[rows.to(memory.mean_images.device)].to(device)  # (n_classes, C, H, W)
    x0 = synthesis.initial_images(draws, mean_images, cfg).to(device)
    layers = bn_layers(teacher)
    with torch.no_grad():
        if not layers or not group_ids:
            targets = []
        elif cfg.class_stats == "running":
            targets = synthesis.running_targets(layers, len(group_ids))
        else:
            assert memory is not None
            rows = memory.rows(torch.arange(n_classes))
            means = [m[rows.to(m.device)] for m in memory.layer_means]
            variances = [v[rows.to(v.device)] for v in memory.layer_vars]
            targets = synthesis.class_mixture_targets(layers, labels, len(group_ids), means, variances)
    shifts, flips = draws.shifts.to(device), draws.flips.to(device)
    return synthesis.synthesize(
        teacher, x0, labels, targets, cfg, shifts, flips, group_chunk=group_chunk, progress=progress
    )


def replay_impressions(
    teacher: nn.Module, ctx: TaskContext, cfg: Config, image_shape: tuple[int, ...], memory: ClassMemory | None
) -> ImageSet:
    """Images of the ``ctx.n_old`` old classes before task ``ctx.task``: synthesised, drawn to a PNG grid, logged.

    Under torchrun each rank optimises a contiguous share of the ``nb_generation`` batches and every rank
    receives all of them, in batch order: the same images as a single process (per-batch seeds).
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    share = range(cfg.nb_generation)[distributed.shard_range(cfg.nb_generation)]
    chunk = synthesis.default_group_chunk(ctx.device)
    result = synthesize_classes(
        teacher, ctx.n_old, image_shape, cfg, seed, ctx.device, memory, share, chunk, progress=cfg.progress
    )
    images, teacher_acc = result.images, result.teacher_accuracy
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.loss_terms.items())
    log.info("synthesised %d impressions: teacher accuracy %.1f%%, %s", len(images), teacher_acc, summary)
    if ctx.log is not None and not distributed.is_distributed():  # per-rank terms are partial under torchrun
        scalars = {f"synthesis/{k}": v for k, v in result.loss_terms.items()}
        ctx.log.log_scalars({**scalars, "synthesis/teacher_accuracy": teacher_acc}, None)
    if distributed.is_distributed():
        images = ImageSet(distributed.all_gather_rows(images.x), distributed.all_gather_rows(images.y))
        teacher_acc = synthesis.teacher_accuracy(teacher, images.x, images.y, batch_size=cfg.syn_batch_size)
    path = ctx.output_dir / f"impressions_task_{ctx.task}.png"
    if distributed.is_main():
        mean_images = memory.mean_images if memory is not None and cfg.syn_init == "mean" else None
        plot_impressions(path, images.x, images.y, mean_images, ctx.class_names, title=ctx.title)
    log.info(
        "task %d: %d synthetic images of %d old classes, teacher accuracy on them %.1f%% (grid: %s)",
        ctx.task,
        len(images),
        ctx.n_old,
        teacher_acc,
        path,
    )
    if ctx.log is not None:
        ctx.log.log_scalars({f"task{ctx.task}/impressions_teacher_accuracy": teacher_acc}, None)
        ctx.log.log_image(f"impressions_task_{ctx.task}", str(path))
    return images.to(ctx.device)


def class_weights(real_labels: Tensor, synthetic: ImageSet | None, n_seen: int, cfg: Config) -> Tensor | None:
    """CE class weights (n_seen,) per ``class_weights``, or None (plain CE). ``counts``: n_max / n_c over the real
    and synthetic sets; ``sampled``: the same on each class's expected share of the rows drawn (``rs_ratio``)."""
    if cfg.class_weights == "none":
        return None
    labels = real_labels if synthetic is None else torch.cat([real_labels, synthetic.y])
    counts = torch.bincount(labels, minlength=n_seen).float()  # (n_seen,)
    if cfg.class_weights == "sampled" and synthetic is not None and len(synthetic) > 0:
        real = torch.bincount(real_labels.cpu(), minlength=n_seen).double()
        syn = torch.bincount(synthetic.y.cpu(), minlength=n_seen).double()
        counts = (1 - cfg.rs_ratio) * real / real.sum() + cfg.rs_ratio * syn / syn.sum()  # drawn share per class
    return losses.class_balance_weights(counts)


def local_logits(logits: Tensor, synthetic: Tensor, n_old: int) -> Tensor:
    """``logits`` (B, n_seen) with the other task's columns at -inf: on real rows (``synthetic`` (B,) False) the old
    classes', on synthetic rows the new classes'. A CE on them is over the row's own side only (local CE)."""
    old_columns = torch.arange(logits.shape[1], device=logits.device) < n_old  # (n_seen,)
    mask = synthetic.to(logits.device)[:, None] != old_columns[None, :]  # (B, n_seen): True where masked
    return logits.masked_fill(mask, float("-inf"))


def refit_head(
    net: nn.Module,
    ctx: TaskContext,
    synthetic: ImageSet,
    cfg: Config,
    device: torch.device,
    prototypes: FeaturePrototypes | None = None,
) -> None:
    """Class-balanced CE (w_c = n_max / n_c) on the whole head (old block included), ``ccsi_head_refit_epochs``
    epochs of SGD over the frozen features of the task's real images and its impressions (shuffled with the task's
    generator: the same on every rank under torchrun). The old classes' rows: the impressions' features, or draws
    around their ``prototypes``. The backbone and its normalisation statistics stay."""
    net.eval()
    ctx.access.record("statistics", ctx.train.y)  # the task's own images: no old class
    if prototypes is None:
        old_features, old_labels = extract_features(net, synthetic, cfg.eval_batch_size), synthetic.y
    else:  # as many draws per old class as a new class has images, on average
        old_features, old_labels = prototypes.sample(max(len(ctx.train) // ctx.n_new, 1), ctx.generator)
    features = torch.cat([extract_features(net, ctx.train, cfg.eval_batch_size).to(device), old_features.to(device)])
    labels = torch.cat([ctx.train.y.to(device), old_labels.to(device)])  # (N,)
    weights = losses.class_balance_weights(torch.bincount(labels, minlength=ctx.n_seen).float()).to(features)
    head = net.head
    params = list(head.parameters())
    trainable = [p.requires_grad for p in params]  # the old block is frozen while the task trains: refit it too
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.ccsi_head_refit_lr, momentum=cfg.momentum)
    head.train()
    for _ in range(cfg.ccsi_head_refit_epochs):
        order = torch.randperm(len(labels), generator=ctx.generator).to(device)
        for rows in order.split(cfg.batch_size):
            loss = F.cross_entropy(head(features[rows])["logits"], labels[rows], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, flag in zip(params, trainable, strict=True):
        p.requires_grad_(flag)
    net.eval()


# ----- the method ------------------------------------------------------------------------------


@register_method("ccsi")
class CCSI(Method):
    """Data-free: old classes come back only as impressions synthesised from the frozen previous model."""

    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {"head": "cosine", "K": 1, "dist": 0.3}  # CCSI's margin ranking values
    masks_padded_rows = True

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.memory = self.add_part("memory", ClassMemory())  # class mean images + per-class CN moments only
        self.prototypes = self.add_part("prototypes", FeaturePrototypes()) if cfg.ccsi_prototypes else None
        self.synthetic: ImageSet | None = None
        self.class_weights: Tensor | None = None
        self.lamda_t = 0.0
        self.idc: losses.IntraDomainContrastive | None = None
        self.idc_pool: ImageSet | None = None  # on the training device
        self.idc_draws: RowDraws | None = None  # the epoch's IdC rows: the loader draws them, batches carry them
        self.generator: torch.Generator | None = None
        self.teacher_cache: TeacherCache | None = None  # the teacher's features of this task's real + synthetic rows
        self.access: DataAccess | None = None

    def reads_held_out(self, cfg: Config) -> tuple[str, ...]:
        return (cfg.idc_source,) if cfg.idc_source in ("val", "test") and cfg.da_coef > 0 else ()

    @classmethod
    def check(cls, cfg: Config, task_sizes: list[int]) -> None:
        if cfg.ccsi_prototype_drift and not cfg.ccsi_prototypes:
            raise ConfigError("key 'ccsi_prototype_drift': moves the stored prototypes; set ccsi_prototypes: true")
        for task, n_new in enumerate(task_sizes[1:], start=2):
            task_cfg = cfg.for_task(task)
            if task_cfg.class_stats_update == "refresh" and task_cfg.class_stats != "per_class":
                raise ConfigError(
                    "key 'class_stats_update': refresh changes the stored per-class moments, which only "
                    f"class_stats: per_class uses (task {task} has class_stats: {task_cfg.class_stats}); set "
                    "class_stats: per_class, or class_stats_update: frozen (or protocol: clean, the released targets)"
                )
            k = task_cfg.K
            if k > n_new:
                raise ConfigError(
                    f"key 'K': margin ranking against the top {k} new classes, but task {task} adds only {n_new}; "
                    f"set K <= {n_new}"
                )

    # ----- task life cycle ---------------------------------------------------------------
    def before_task(self, ctx: TaskContext) -> None:
        cfg = self.cfg
        self.generator, self.synthetic, self.idc, self.access = ctx.generator, None, None, ctx.access
        if ctx.task > 1:
            assert self.teacher is not None
            self.synthetic = replay_impressions(self.teacher, ctx, cfg, tuple(ctx.train.x.shape[1:]), self.memory)
        self.net.expand_head(ctx.n_new)
        if ctx.task > 1:
            prepare_cosine_head(self.net, ctx.train, cfg)
            self.lamda_t = less_forget_weight(cfg, ctx.n_old, ctx.n_new)
            if cfg.da_coef > 0:
                self.idc = losses.IntraDomainContrastive(cfg.ro, cfg.temprature)
                pool = {"test": ctx.test, "val": ctx.val, "train": ctx.train}[cfg.idc_source]
                if pool is None or len(pool) == 0:
                    raise ValueError(f"idc_source '{cfg.idc_source}' holds no image for task {ctx.task}")
                self.idc_pool = pool.to(self.device)  # once per task: a step's gather copies nothing
        if self.teacher is not None:
            self.teacher_cache = TeacherCache(self.teacher, "features", ctx.train, self.synthetic, cfg.eval_batch_size)
        weights = class_weights(ctx.train.y, self.synthetic, ctx.n_seen, cfg)
        self.class_weights = None if weights is None else weights.to(self.device)

    def replay(self, ctx: TaskContext) -> tuple[ImageSet | None, float]:
        return self.synthetic, self.cfg.rs_ratio

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        """The base batches, with the epoch's augmentation and IdC rows drawn when the epoch starts (in the order
        per-step draws would make them: nothing else draws from ``ctx.generator`` during the epoch)."""
        loader = super().train_batches(ctx, epoch)
        assert isinstance(loader, BatchLoader)
        self.idc_draws = None
        if self.idc is not None:
            assert self.idc_pool is not None
            self.idc_draws = RowDraws(len(self.idc_pool), self.device, min_rows=distributed.world_size())
        loader.epoch_draws, loader.row_draws = True, self.idc_draws
        return loader

    def on_epoch_start(self, ctx: TaskContext, epoch: int) -> None:
        self.idc_draws = None  # the last epoch's draws are spent; this epoch's come with its train_batches
        if self.idc is not None:
            self.idc.reset()  # the authors reset the IdC centroids every epoch

    def before_step(self, batch: Batch) -> Batch:
        """The IdC rows (the loader's ``draws``, else drawn now: a host draw and a copy) and their count; the
        teacher cache's table, built on the first batch that can use it."""
        if self.teacher_cache is not None and batch.index is not None:
            self.teacher_cache.build()
        if self.idc is None:
            return batch
        assert self.idc_pool is not None
        if batch.draws is None:  # a batch from elsewhere
            batch = replace(batch, draws=batch.draw_rows(len(self.idc_pool), self.generator).to(self.device))
        if self.access is not None:
            self.access.record("idc", self.idc_pool.y[batch.draws], batch.valid)
        return batch

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        out = self.net(batch.x)
        valid, shard = batch.valid, batch.shard  # valid: None, or False on padding rows (compile: graphs)
        if self.teacher is None:
            ce = losses.weighted_cross_entropy(out["logits"], batch.y, self.class_weights, shard, valid)
            return {"loss": ce, "ce": ce}
        terms = self.cross_entropy(out, batch)
        ref = self.teacher_cache.lookup(batch) if self.teacher_cache is not None else None  # once per task
        if ref is None:
            with torch.no_grad():
                ref = self.teacher(batch.x)["features"]  # (B, D)
        terms |= {
            "distill": losses.less_forget(out["features"], ref, self.lamda_t, valid, shard),
            "margin": losses.margin_ranking(
                out["scores"], batch.y, self.n_old, self.cfg.K, self.cfg.dist, shard, valid
            ),
        }
        loss = terms["ce"] + terms["distill"] + self.cfg.lw_mr * terms["margin"]
        if "head_ce" in terms:
            loss = loss + terms["head_ce"]
        if self.idc is not None:
            assert self.idc_pool is not None and batch.draws is not None, "IdC rows come with before_step"
            target = as_float(self.idc_pool.x[batch.draws])  # (B, C, H, W)
            terms["idc"] = self.idc(out["scores"], batch.y, self.net(target)["scores"], shard, valid)
            loss = loss + self.cfg.da_coef * terms["idc"]
        return {"loss": loss, **terms}

    def cross_entropy(self, out: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """``ce``: the class-weighted CE over all seen classes; with ``ccsi_local_ce`` the local CE, and ``head_ce``,
        the head's CE over all seen classes on detached features."""
        weights, shard, valid = self.class_weights, batch.shard, batch.valid
        if not self.cfg.ccsi_local_ce:
            return {"ce": losses.weighted_cross_entropy(out["logits"], batch.y, weights, shard, valid)}
        local = local_logits(out["logits"], batch.synthetic, self.n_old)
        head = self.net.head(out["features"].detach())["logits"]  # (B, n_seen): only the head learns from it
        return {
            "ce": losses.weighted_cross_entropy(local, batch.y, weights, shard, valid),
            "head_ce": losses.weighted_cross_entropy(head, batch.y, weights, shard, valid),
        }

    def after_task(self, ctx: TaskContext) -> None:
        """Keep what synthesis needs: the new classes' mean images and CN moments (no real image); with
        ``class_stats_update: refresh`` the old classes' moments re-estimated on this task's impressions. Before that,
        the options: old prototypes moved by the task's feature drift, the head refit, the new classes' prototypes."""
        self.net.eval()
        if self.cfg.ccsi_prototype_drift and self.teacher is not None and self.prototypes is not None:
            batch = self.cfg.eval_batch_size
            before, after = (
                extract_features(self.teacher, ctx.train, batch),
                extract_features(self.net, ctx.train, batch),
            )
            self.prototypes.compensate_drift(before, after)  # the task's own images: no old class
        if self.cfg.ccsi_head_refit_epochs > 0 and self.synthetic is not None:
            refit_head(self.net, ctx, self.synthetic, self.cfg, self.device, self.prototypes)
        if self.prototypes is not None:
            self.prototypes.add_task(self.net, ctx.train, self.cfg.eval_batch_size)  # the task's own images
        if self.cfg.class_stats_update == "refresh" and self.synthetic is not None:
            self.memory.refresh(self.net, self.synthetic, self.cfg.eval_batch_size, self.device)
        ctx.access.record("statistics", ctx.train.y)
        self.memory.add_task(self.net, ctx.train, batch_size=self.cfg.eval_batch_size, device=self.device)
        self.synthetic, self.idc, self.idc_pool, self.teacher_cache = None, None, None, None
        self.idc_draws = None
