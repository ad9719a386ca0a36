"""Continual class-specific impressions (CCSI): images of old classes synthesised from a frozen model.

After each task the method keeps, per class and never any real image: the mean image and the
channel moments (mean, variance) of the input of every ``nn.BatchNorm2d`` of the trained model
(``ClassMemory``). Before the next task, ``synthesize`` optimises ``nb_generation`` batches of
``syn_batch_size`` images, started from the class mean images plus noise, so that the frozen
teacher classifies them as their labels while their per-layer moments match the stored ones
(DeepInversion, Yin et al. CVPR 2020; Ayromlou et al. 2024). The batches are independent problems
and are optimised together in one tensor; ``vectorised=False`` runs the same optimisation one batch
at a time (identical up to float rounding), for tests and benchmarks.

Differences to the released code, on purpose: all channels are clamped to [0, 1] (the original
clamps channel 0 with ImageNet constants); the kept iterate is the image the lowest loss was
measured on (the original keeps the image after that step); the initial images are clamped too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import distributed
import synthesis_losses as sl
from config import Config, Option, register_options
from dataloaders.image_set import ImageSet, as_float
from synthesis_losses import LOSS_TERMS, LossWeights, bn_layers, capture_bn_inputs, eval_mode, teacher_logits

if TYPE_CHECKING:
    from methods.base import TaskContext

logger = logging.getLogger(__name__)

register_options(
    "synthesis",
    [
        Option("nb_generation", "int", 16, "batches of impressions synthesised per task (CCSI: 16-35)", min=0),
        Option("syn_batch_size", "int", 40, "images per synthesis batch; moments are matched per batch", min=1),
        Option("syn_iterations", "int", 5000, "Adam steps per batch; 0 returns the initial images", min=0),
        Option("generation_lr", "float", 0.05, "Adam learning rate on the pixels (CCSI configs: 0.05)", min=1e-12),
        Option("beta_2", "float", 0.9, "Adam beta2; beta1 is 0.5 as in DeepInversion", min=1e-6, max=1 - 1e-6),
        Option("syn_warmup", "int", 100, "iterations of linear learning-rate warm-up", min=0),
        Option(
            "syn_cosine_factor",
            "float",
            0.5,
            "after warm-up lr = generation_lr * factor * (1 + cos(pi * progress)); DeepInversion 0.5, CCSI code 0.2",
            min=1e-12,
        ),
        Option("init_noise", "float", 0.1, "std of the Gaussian noise added to the class mean image at init", min=0.0),
        Option(
            "syn_init",
            "str",
            "mean",
            "initial images: class mean + noise (CCSI) or N(0,1) noise",
            choices=("mean", "noise"),
        ),
        Option("random_label", "bool", True, "labels uniform over seen classes; false: cyclic 0, 1, 2, ..."),
        Option("jitter", "int", 2, "max random circular shift in px per iteration (released CCSI code: 30)", min=0),
        Option("do_flip", "bool", True, "random horizontal flip (p=0.5) per iteration"),
        Option("main_loss_multiplier", "float", 1.0, "weight of the cross-entropy of the teacher's logits", min=0.0),
        Option("r_feature", "float", 1.0, "weight of the moment-matching term (CCSI configs: 1)", min=0.0),
        Option("first_bn_multiplier", "float", 10.0, "extra weight of the first normalisation layer's term", min=0.0),
        Option("tv_l2", "float", 0.01, "weight of the total-variation prior (CCSI configs: 0.01 or 0.001)", min=0.0),
        Option(
            "l2", "float", 0.1, "weight of the mean image L2 norm (CCSI configs: 0.1; argparse default 1e-5)", min=0.0
        ),
        Option(
            "class_stats",
            "str",
            "per_class",
            "moment targets: running = the layer's running mean/var; per_class = the batch's class mixture",
            choices=("running", "per_class"),
        ),
        Option("syn_log_every", "int", 100, "iterations between progress-bar refreshes of the loss terms", min=1),
    ],
)

# ----- what is kept about each class ------------------------------------------------------


def class_mean_images(images: ImageSet, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(labels (K,) sorted, mean images (K, C, H, W) float in [0, 1]) of the classes present in ``images``."""
    labels, inverse = torch.unique(images.y, sorted=True, return_inverse=True)
    sums = torch.zeros((len(labels), *images.x.shape[1:]), dtype=torch.float64, device=images.x.device)
    for start in range(0, len(images), chunk):
        x = as_float(images.x[start : start + chunk]).double()  # (n, C, H, W)
        sums.index_add_(0, inverse[start : start + chunk].to(x.device), x)
    counts = torch.bincount(inverse, minlength=len(labels)).to(sums)
    return labels.cpu(), (sums / counts[:, None, None, None]).float().cpu()


@torch.no_grad()
def class_statistics(
    net: nn.Module, images: ImageSet, batch_size: int, device: torch.device | str
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per hooked layer: (labels (K,), mean (K, ch), population variance (K, ch)) of the layer's input per class.

    Accumulated over samples x pixels with ``net`` in eval mode (sums and sums of squares by label, float64).
    """
    layers = bn_layers(net)
    labels, inverse = torch.unique(images.y, sorted=True, return_inverse=True)
    k = len(labels)
    sums = [torch.zeros(k, layer.num_features, dtype=torch.float64, device=device) for layer in layers]
    squares = [torch.zeros_like(s) for s in sums]
    pixels = [torch.zeros(k, dtype=torch.float64, device=device) for _ in layers]  # samples x pixels per class
    with eval_mode(net), capture_bn_inputs(layers) as store:
        for start in range(0, len(images), batch_size):
            x = as_float(images.x[start : start + batch_size]).to(device)  # (b, C, H, W)
            idx = inverse[start : start + batch_size].to(device)
            store.clear()
            net(x)
            for i in range(len(layers)):
                if i not in store:
                    raise ValueError(f"normalisation layer {i} ({layers[i]}) was not used in the forward pass")
                a = store[i].double()  # (b, ch, h, w)
                sums[i].index_add_(0, idx, a.sum(dim=(2, 3)))
                squares[i].index_add_(0, idx, a.square().sum(dim=(2, 3)))
                pixels[i].index_add_(0, idx, torch.full_like(idx, a[0, 0].numel(), dtype=torch.float64))
    out = []
    for s, q, n in zip(sums, squares, pixels):
        mean = s / n[:, None]
        var = (q / n[:, None] - mean.square()).clamp_min(0.0)
        out.append((labels.cpu(), mean.cpu(), var.cpu()))
    return out


class ClassMemory:
    """Per class: the mean image and the moments of every hooked layer's input; merged across tasks."""

    def __init__(self) -> None:
        self.labels = torch.zeros(0, dtype=torch.long)  # (K,) sorted
        self.mean_images: Tensor | None = None  # (K, C, H, W) float in [0, 1]
        self.layer_means: list[Tensor] = []  # per layer (K, ch) float64
        self.layer_vars: list[Tensor] = []  # per layer (K, ch) float64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_layers(self) -> int:
        return len(self.layer_means)

    def add(self, labels: Tensor, mean_images: Tensor, stats: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """Merge classes in; a class already present is replaced."""
        labels = labels.long().cpu()
        if self.mean_images is not None and mean_images.shape[1:] != self.mean_images.shape[1:]:
            raise ValueError(
                f"mean images {tuple(mean_images.shape[1:])} differ from {tuple(self.mean_images.shape[1:])}"
            )
        if len(self) and len(stats) != self.num_layers:
            raise ValueError(f"got statistics of {len(stats)} layers, the memory holds {self.num_layers}")
        for layer_labels, _, _ in stats:
            if not torch.equal(layer_labels.cpu(), labels):
                raise ValueError("class statistics and mean images are for different labels")
        keep = ~torch.isin(self.labels, labels)
        order = torch.argsort(torch.cat([self.labels[keep], labels]))

        def merge(old: Tensor | None, new: Tensor) -> Tensor:
            new = new.detach().cpu()
            if old is None:
                return new[order]
            return torch.cat([old[keep.to(old.device)], new.to(old)])[order.to(old.device)]

        self.mean_images = merge(self.mean_images, mean_images.float())
        old_means = self.layer_means or [None] * len(stats)
        old_vars = self.layer_vars or [None] * len(stats)
        self.layer_means = [merge(o, m.double()) for o, (_, m, _) in zip(old_means, stats)]
        self.layer_vars = [merge(o, v.double()) for o, (_, _, v) in zip(old_vars, stats)]
        self.labels = torch.cat([self.labels[keep], labels])[order]

    def add_task(self, net: nn.Module, images: ImageSet, batch_size: int, device: torch.device | str) -> None:
        """Compute and merge the mean images and class statistics of the classes in ``images``."""
        labels, means = class_mean_images(images)
        self.add(labels, means, class_statistics(net, images, batch_size, device))

    def rows(self, labels: Tensor) -> Tensor:
        """Row index of each label; raises if a label is not stored."""
        labels = labels.cpu()
        missing = sorted(set(labels.tolist()) - set(self.labels.tolist()))
        if missing:
            raise ValueError(f"class memory has no entry for classes {missing} (stored: {self.labels.tolist()})")
        return torch.searchsorted(self.labels, labels)

    def state_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels.clone(),
            "mean_images": None if self.mean_images is None else self.mean_images.clone(),
            "layer_means": [m.clone() for m in self.layer_means],
            "layer_vars": [v.clone() for v in self.layer_vars],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels = state["labels"].long()
        self.mean_images = state["mean_images"]
        self.layer_means = list(state["layer_means"])
        self.layer_vars = list(state["layer_vars"])

    def to(self, device: torch.device | str) -> ClassMemory:
        """Move the tensors (labels stay on the CPU for lookups); returns self."""
        if self.mean_images is not None:
            self.mean_images = self.mean_images.to(device)
        self.layer_means = [m.to(device) for m in self.layer_means]
        self.layer_vars = [v.to(device) for v in self.layer_vars]
        return self


# ----- synthesis ---------------------------------------------------------------------------


@dataclass
class SynthesisResult:
    """Synthesised impressions and how the optimisation went (per batch = per group)."""

    images: ImageSet  # float (G*B, C, H, W) in [0, 1], labels (G*B,), on the synthesis device
    teacher_accuracy: float  # percent of impressions the teacher classifies as their label (no augmentation)
    loss_terms: dict[str, float]  # ce, bn, tv, l2 (unweighted), total (weighted): mean over kept iterates
    best_loss: Tensor  # (G,) total loss of each kept iterate
    last_loss: Tensor  # (G,) total loss of each batch's last iterate
    best_iteration: Tensor  # (G,) iteration of each kept iterate (0 = the initial images)


@dataclass
class _GroupDraws:
    """Everything random about one batch, drawn from its own generator."""

    labels: Tensor  # (B,)
    noise: Tensor  # (B, C, H, W) standard normal
    shifts: Tensor  # (T+1, 2) circular shift (dy, dx) per evaluation
    flips: Tensor  # (T+1,) bool


def group_seed(seed: int, group: int) -> int:
    """Seed of batch ``group``'s generator, derived from (seed, group) with numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, group]).generate_state(1)[0])


def _draw_group(seed: int, group: int, n_classes: int, shape: tuple[int, ...], cfg: Config) -> _GroupDraws:
    gen = torch.Generator().manual_seed(group_seed(seed, group))
    b, t = cfg.syn_batch_size, cfg.syn_iterations + 1
    if cfg.random_label:
        labels = torch.randint(0, n_classes, (b,), generator=gen)
    else:
        labels = torch.arange(b) % n_classes
    noise = torch.randn((b, *shape), generator=gen)
    shifts = torch.randint(-cfg.jitter, cfg.jitter + 1, (t, 2), generator=gen)
    flips = torch.rand(t, generator=gen) < 0.5
    return _GroupDraws(labels, noise, shifts, flips & cfg.do_flip)


def _moment_targets(
    layers: list[nn.BatchNorm2d], memory: ClassMemory, labels: Tensor, groups: int, n_classes: int, cfg: Config
) -> list[tuple[Tensor, Tensor]]:
    """Per layer (mean (G, ch), var (G, ch)) targets of each group, float32 on the labels' device."""
    if cfg.class_stats == "running":
        if any(layer.running_mean is None or layer.running_var is None for layer in layers):
            raise ValueError("class_stats 'running' needs running statistics in every BatchNorm2d of the teacher")
        return [(m.running_mean.float().expand(groups, -1), m.running_var.float().expand(groups, -1)) for m in layers]
    if memory.num_layers != len(layers):
        raise ValueError(f"class memory holds statistics of {memory.num_layers} layers, the teacher has {len(layers)}")
    rows = memory.rows(torch.arange(n_classes))
    freq = sl.label_frequencies(labels, groups, n_classes)  # (G, n_classes) float64
    out = []
    for layer, means, variances in zip(layers, memory.layer_means, memory.layer_vars):
        if means.shape[1] != layer.num_features:
            raise ValueError(f"stored statistics have {means.shape[1]} channels, {layer} has {layer.num_features}")
        r = rows.to(means.device)
        m, v = sl.mixture_moments(freq, means[r].to(labels.device), variances[r].to(labels.device))
        out.append((m.float(), v.float()))
    return out


def loss_weights(cfg: Config) -> LossWeights:
    return LossWeights(cfg.main_loss_multiplier, cfg.r_feature, cfg.first_bn_multiplier, cfg.tv_l2, cfg.l2)


def _optimise(
    teacher: nn.Module,
    layers: list[nn.BatchNorm2d],
    x0: Tensor,
    y: Tensor,
    shifts: Tensor,
    flips: Tensor,
    targets: list[tuple[Tensor, Tensor]],
    cfg: Config,
    bar: tqdm,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Optimise G groups together: kept images (G*B, ...), their terms (G, 5), iteration (G,), last loss (G,)."""
    g, b = shifts.shape[1], len(y) // shifts.shape[1]
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=cfg.generation_lr, betas=(0.5, cfg.beta_2), eps=1e-8)
    best_x = x0.clone()
    best_terms = torch.full((g, len(LOSS_TERMS)), float("inf"), device=x.device)
    best_it = torch.zeros(g, dtype=torch.long, device=x.device)
    weights = loss_weights(cfg)

    def augment(images: Tensor, it: int) -> Tensor:
        x5 = images.reshape(g, b, *images.shape[1:])  # (G, B, C, H, W)
        return sl.jitter_flip(x5, shifts[it], flips[it]) if cfg.jitter > 0 or cfg.do_flip else x5

    def keep_best(terms: Tensor, images: Tensor, it: int) -> None:
        nonlocal best_x, best_terms, best_it
        better = terms[:, -1] < best_terms[:, -1]  # (G,)
        best_terms = torch.where(better[:, None], terms, best_terms)
        best_it = torch.where(better, it, best_it)
        best_x = torch.where(better.repeat_interleave(b)[:, None, None, None], images, best_x)

    with capture_bn_inputs(layers) as store:
        for it in range(cfg.syn_iterations):
            for group in optimizer.param_groups:
                group["lr"] = sl.learning_rate(
                    it, cfg.syn_iterations, cfg.generation_lr, cfg.syn_warmup, cfg.syn_cosine_factor
                )
            terms = sl.impression_loss(teacher, layers, store, augment(x, it), y, targets, weights)
            (x.grad,) = torch.autograd.grad(terms[:, -1].sum(), x)
            keep_best(terms.detach(), x.detach(), it)  # the images this loss was measured on
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
            bar.update(1)
            if (it + 1) % cfg.syn_log_every == 0 or it + 1 == cfg.syn_iterations:
                bar.set_postfix(dict(zip(LOSS_TERMS, terms.detach().mean(dim=0).tolist())), refresh=False)
        with torch.no_grad():  # the last iterate is a candidate too
            terms = sl.impression_loss(teacher, layers, store, augment(x, -1), y, targets, weights)
        keep_best(terms, x.detach(), cfg.syn_iterations)
    return best_x, best_terms, best_it, terms[:, -1]


def synthesize(
    teacher: nn.Module,
    memory: ClassMemory,
    n_classes: int,
    cfg: Config,
    seed: int,
    device: torch.device | str,
    progress: bool = True,
    log: Any = None,
    *,
    vectorised: bool = True,
    max_group_chunk: int | None = None,
    groups: Sequence[int] | None = None,
    log_step: int | None = None,
) -> SynthesisResult:
    """Synthesise ``nb_generation`` batches of impressions of classes 0..n_classes-1 from the frozen ``teacher``.

    Batch g draws labels, init noise, shifts and flips from its own generator seeded from (seed, g), so the
    result does not depend on ``vectorised`` (all batches in one tensor) or ``max_group_chunk`` (batches
    per tensor) beyond float rounding; ``groups`` (default range(nb_generation)) picks batches, e.g. one
    shard per rank. ``log`` (``log_scalars(dict, step)``) receives the final terms at ``log_step``.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if max_group_chunk is not None and max_group_chunk < 1:
        raise ValueError(f"max_group_chunk must be >= 1 or None, got {max_group_chunk}")
    if memory.mean_images is None:
        raise ValueError("class memory is empty: add the classes' mean images and statistics first")
    device = torch.device(device)
    rows = memory.rows(torch.arange(n_classes))
    mean_images = memory.mean_images[rows.to(memory.mean_images.device)].to(device)  # (n_classes, C, H, W)
    group_ids = list(range(cfg.nb_generation)) if groups is None else [int(g) for g in groups]
    if any(g < 0 for g in group_ids):
        raise ValueError(f"group indices must be >= 0, got {group_ids}")
    n_groups, b = len(group_ids), cfg.syn_batch_size
    shape = tuple(mean_images.shape[1:])
    if n_groups == 0:
        empty = ImageSet(torch.zeros((0, *shape), device=device), torch.zeros(0, dtype=torch.long, device=device))
        none = torch.zeros(0)
        return SynthesisResult(empty, 0.0, dict.fromkeys(LOSS_TERMS, 0.0), none, none, none.long())
    layers = bn_layers(teacher)
    if not layers and cfg.r_feature > 0:
        raise ValueError("the teacher has no nn.BatchNorm2d layer to match moments on; set r_feature to 0")

    draws = [_draw_group(seed, g, n_classes, shape, cfg) for g in group_ids]
    y = torch.cat([d.labels for d in draws]).to(device)  # (G*B,)
    noise = torch.cat([d.noise for d in draws]).to(device)  # (G*B, C, H, W)
    x0 = mean_images[y] + cfg.init_noise * noise if cfg.syn_init == "mean" else noise
    x0 = x0.clamp(0.0, 1.0)
    shifts = torch.stack([d.shifts for d in draws], dim=1).to(device)  # (T+1, G, 2)
    flips = torch.stack([d.flips for d in draws], dim=1).to(device)  # (T+1, G)

    chunk = 1 if not vectorised else min(max_group_chunk or n_groups, n_groups)
    outputs = []
    with eval_mode(teacher), torch.no_grad():
        logits_width = teacher_logits(teacher(x0[:1])).shape[1]
    if logits_width < n_classes:
        raise ValueError(f"the teacher has {logits_width} outputs, fewer than n_classes={n_classes}")
    bar = tqdm(total=cfg.syn_iterations * -(-n_groups // chunk), desc="synthesis", disable=not progress, leave=False)
    with eval_mode(teacher), bar:
        for start in range(0, n_groups, chunk):
            stop = min(start + chunk, n_groups)
            sel = slice(start * b, stop * b)
            with torch.no_grad():
                targets = _moment_targets(layers, memory, y[sel], stop - start, n_classes, cfg) if layers else []
            outputs.append(
                _optimise(
                    teacher, layers, x0[sel], y[sel], shifts[:, start:stop], flips[:, start:stop], targets, cfg, bar
                )
            )
    images = torch.cat([o[0] for o in outputs])
    terms = torch.cat([o[1] for o in outputs])
    result = SynthesisResult(
        images=ImageSet(images, y),
        teacher_accuracy=teacher_accuracy(teacher, images, y, batch_size=b * chunk),
        loss_terms=dict(zip(LOSS_TERMS, terms.mean(dim=0).tolist())),
        best_loss=terms[:, -1].cpu(),
        last_loss=torch.cat([o[3] for o in outputs]).cpu(),
        best_iteration=torch.cat([o[2] for o in outputs]).cpu(),
    )
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.loss_terms.items())
    logger.info(
        "synthesised %d impressions of %d classes: teacher accuracy %.1f%%, %s",
        len(y),
        n_classes,
        result.teacher_accuracy,
        summary,
    )
    if log is not None:
        scalars = {f"synthesis/{k}": v for k, v in result.loss_terms.items()}
        log.log_scalars({**scalars, "synthesis/teacher_accuracy": result.teacher_accuracy}, log_step)
    return result


@torch.no_grad()
def teacher_accuracy(teacher: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Percent of ``images`` that ``teacher`` (in eval mode) assigns to ``labels``."""
    if len(labels) == 0:
        return 0.0
    correct = torch.zeros((), device=labels.device)
    with eval_mode(teacher):
        for start in range(0, len(labels), batch_size):
            pred = teacher_logits(teacher(images[start : start + batch_size])).argmax(dim=1)
            correct += (pred == labels[start : start + batch_size]).sum()
    return 100.0 * correct.item() / len(labels)


def save_impressions_grid(path: str | Path, images: ImageSet, memory: ClassMemory, per_class: int = 8) -> Path:
    """PNG with one row per stored class: its mean image, then its first ``per_class`` impressions (blank if fewer)."""
    from torchvision.utils import save_image

    if memory.mean_images is None:
        raise ValueError("class memory is empty: nothing to draw")
    labels = memory.labels
    k, cols = len(labels), per_class + 1
    grid = torch.ones((k, cols, *memory.mean_images.shape[1:]))  # (K, 1 + per_class, C, H, W), white padding
    grid[:, 0] = memory.mean_images.cpu()
    y, x = images.y.cpu(), as_float(images.x).cpu()
    known = torch.isin(y, labels)
    y, x = y[known], x[known]
    order = torch.argsort(y, stable=True)
    sorted_y = y[order]
    row = torch.searchsorted(labels, sorted_y)  # class row of each impression
    rank = torch.arange(len(sorted_y)) - torch.searchsorted(sorted_y, sorted_y)  # position within its class
    keep = rank < per_class
    grid[row[keep], 1 + rank[keep]] = x[order[keep]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.flatten(0, 1), path, nrow=cols, padding=1, pad_value=1.0)
    return path


def synthesize_for_task(teacher: nn.Module, memory: ClassMemory, ctx: TaskContext, device: torch.device) -> ImageSet:
    """Images of the ``ctx.n_old`` old classes before task ``ctx.task``: synthesised, drawn to a PNG grid, logged.

    Under torchrun each rank optimises a contiguous share of the ``nb_generation`` batches and every rank
    receives all of them, in batch order: the same images as a single process (per-batch seeds).
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    share = range(ctx.cfg.nb_generation)[distributed.shard_range(ctx.cfg.nb_generation)]
    result = synthesize(
        teacher,
        memory,
        ctx.n_old,
        ctx.cfg,
        seed=seed,
        device=device,
        progress=ctx.cfg.progress,
        log=ctx.log if not distributed.is_distributed() else None,
        groups=share,
    )
    images = result.images
    teacher_acc = result.teacher_accuracy
    if distributed.is_distributed():
        images = ImageSet(distributed.all_gather_rows(images.x), distributed.all_gather_rows(images.y))
        teacher_acc = teacher_accuracy(teacher, images.x, images.y, batch_size=ctx.cfg.syn_batch_size)
    path = ctx.output_dir / f"impressions_task_{ctx.task}.png"
    if distributed.is_main():
        save_impressions_grid(path, images, memory)
    logger.info(
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
    return images.to(device)
