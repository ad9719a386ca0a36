"""Continual class-specific impressions (CCSI): images of old classes synthesised from a frozen model.

``synthesize`` optimises G independent batches of images so that the frozen teacher classifies them as their
labels while the moments of its normalisation layers' inputs match given targets (DeepInversion, Yin et al.
CVPR 2020; Ayromlou et al. 2024). It is a pure function of the teacher, the initial images, the labels, the
targets, the configuration and the augmentation draws: no files, no ranks, no logging. Around it:
``draw_batches`` (per-batch seeded labels, noise and augmentation), ``initial_images`` (class mean + noise, or
noise), ``running_targets`` / ``class_mixture_targets`` (moment targets). The batches are optimised together in
one tensor; ``group_chunk=1`` runs the same optimisation one batch at a time (identical up to float rounding).
What CCSI keeps per class lives in ``methods/class_statistics.py``; the per-task orchestration (ranks, the
impression grid, logging) in ``methods/ccsi.py``.

Clamp (``syn_clamp``): ``original`` is the released code's ``clip()`` after every step: channel 0 only, to
ImageNet's normalised range of [0, 1] ([-2.118, 2.249]), although its inputs are not normalised; other channels and
the initial images are not clamped. ``unit`` clamps every channel, and the initial images, to [0, 1].
Difference to the released code, on purpose: the kept iterate is the image the lowest loss was measured on (the
original keeps the image after that step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import synthesis_losses as sl
from dataloaders.image_set import ImageSet
from experiment.config import Config, Option, register_options
from runtime import precision
from synthesis_losses import LOSS_TERMS, LossWeights, bn_layers, capture_bn_inputs, eval_mode, teacher_logits

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
        Option(
            "syn_fused_moments",
            "bool",
            True,
            "the moment term in one pass (contiguous sums of x and x^2) and its gradient in one fused multiply-add: "
            "about 1.3x faster synthesis on a CPU (bench/speed.py); false = the two-pass autograd moments of the "
            "released code, equal up to float rounding (Adam amplifies it: pixels differ by up to 5e-2)",
            scope="run",
        ),
        Option(
            "syn_clamp",
            "str",
            "unit",
            "pixel clamp of impressions: unit = every channel and the initial images to [0, 1]; original = the "
            "released code (after each step channel 0 only, to [-2.118, 2.249], ImageNet's normalised [0, 1])",
            choices=("unit", "original"),
        ),
        Option(
            "syn_keep",
            "str",
            "best",
            "iterate kept per batch: best = the lowest loss measured (on that iteration's jittered view), last",
            choices=("best", "last"),
        ),
        Option(
            "syn_log_every",
            "int",
            100,
            "iterations between progress-bar refreshes of the loss terms",
            min=1,
            scope="run",
        ),
    ],
    scope="task",
)

# The released code's clip(): channel 0 clamped to the ImageNet-normalised range of [0, 1] (mean 0.485, std 0.229).
RELEASED_CHANNEL0_RANGE = (-0.485 / 0.229, (1 - 0.485) / 0.229)


def clamp_images_(x: Tensor, mode: str) -> Tensor:
    """Clamp impressions (N, C, H, W) in place after a step (``syn_clamp``): unit = every channel to [0, 1];
    original = channel 0 only, to ``RELEASED_CHANNEL0_RANGE``."""
    if mode == "unit":
        return x.clamp_(0.0, 1.0)
    if mode != "original":
        raise ValueError(f"unknown syn_clamp {mode!r}")
    x[:, 0].clamp_(*RELEASED_CHANNEL0_RANGE)
    return x


# Batches optimised together in one tensor on a CPU: 1 keeps the activations cache-sized (4 batches of 40 3x32x32
# images, 1 thread, interleaved: 1.12x faster than 2 per tensor, 1.28x than 4, the same images bit for bit); a GPU
# takes all batches in one tensor.
CPU_GROUP_CHUNK = 1


def default_group_chunk(device: torch.device | str) -> int | None:
    """Batches per tensor for ``synthesize`` on ``device``: ``CPU_GROUP_CHUNK`` on a CPU, all (None) elsewhere."""
    return CPU_GROUP_CHUNK if torch.device(device).type == "cpu" else None


@dataclass
class SynthesisResult:
    """Synthesised impressions and how the optimisation went (per batch = per group)."""

    images: ImageSet  # float (G*B, C, H, W) (in [0, 1] with syn_clamp unit), labels (G*B,), on the synthesis device
    teacher_accuracy: float  # percent of impressions the teacher classifies as their label (no augmentation)
    loss_terms: dict[str, float]  # ce, bn, tv, l2 (unweighted), total (weighted): mean over kept iterates
    best_loss: Tensor  # (G,) total loss of each kept iterate
    last_loss: Tensor  # (G,) total loss of each batch's last iterate
    best_iteration: Tensor  # (G,) iteration of each kept iterate (0 = the initial images)


@dataclass
class SynthesisDraws:
    """Everything random about G batches, each batch drawn from its own generator (see ``draw_batches``)."""

    labels: Tensor  # (G*B,)
    noise: Tensor  # (G*B, C, H, W) standard normal
    shifts: Tensor  # (T+1, G, 2) circular shift (dy, dx) of each batch at each evaluation
    flips: Tensor  # (T+1, G) bool


def group_seed(seed: int, group: int) -> int:
    """Seed of batch ``group``'s generator, derived from (seed, group) with numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, group]).generate_state(1)[0])


def draw_batches(
    seed: int, groups: Sequence[int], n_classes: int, image_shape: tuple[int, ...], cfg: Config
) -> SynthesisDraws:
    """Labels, init noise, shifts and flips of the batches ``groups``; batch g draws from a generator seeded by
    (seed, g), so a batch gets the same draws whichever other batches are synthesised with it (e.g. on a rank)."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if any(g < 0 for g in groups):
        raise ValueError(f"group indices must be >= 0, got {list(groups)}")
    b, t = cfg.syn_batch_size, cfg.syn_iterations + 1
    labels, noise, shifts, flips = [], [], [], []
    for g in groups:
        gen = torch.Generator().manual_seed(group_seed(seed, g))
        if cfg.random_label:
            labels.append(torch.randint(0, n_classes, (b,), generator=gen))
        else:
            labels.append(torch.arange(b) % n_classes)
        noise.append(torch.randn((b, *image_shape), generator=gen))
        shifts.append(torch.randint(-cfg.jitter, cfg.jitter + 1, (t, 2), generator=gen))
        flips.append((torch.rand(t, generator=gen) < 0.5) & cfg.do_flip)
    if not labels:
        return SynthesisDraws(
            torch.zeros(0, dtype=torch.long),
            torch.zeros((0, *image_shape)),
            torch.zeros((t, 0, 2), dtype=torch.long),
            torch.zeros((t, 0), dtype=torch.bool),
        )
    return SynthesisDraws(torch.cat(labels), torch.cat(noise), torch.stack(shifts, dim=1), torch.stack(flips, dim=1))


def initial_images(draws: SynthesisDraws, mean_images: Tensor | None, cfg: Config) -> Tensor:
    """x0 (G*B, C, H, W): the label's class mean image + ``init_noise`` * noise (CCSI), or the noise itself
    (``syn_init: noise``, DeepInversion), clamped to [0, 1] with ``syn_clamp: unit``; ``mean_images``
    (n_classes, C, H, W) on the synthesis device."""
    noise = draws.noise.to(mean_images.device if mean_images is not None else draws.noise.device)
    if cfg.syn_init == "noise":
        x0 = noise
    elif mean_images is None:
        raise ValueError("syn_init 'mean' needs the class mean images")
    else:
        x0 = mean_images[draws.labels.to(mean_images.device)] + cfg.init_noise * noise
    return x0.clamp(0.0, 1.0) if cfg.syn_clamp == "unit" else x0  # the released code does not clamp its init


def running_targets(layers: list[nn.BatchNorm2d], groups: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer (mean (G, ch), var (G, ch)): the layer's running statistics, the same for every group."""
    if any(layer.running_mean is None or layer.running_var is None for layer in layers):
        raise ValueError("class_stats 'running' needs running statistics in every BatchNorm2d of the teacher")
    return [(m.running_mean.float().expand(groups, -1), m.running_var.float().expand(groups, -1)) for m in layers]


def class_mixture_targets(
    layers: list[nn.BatchNorm2d], labels: Tensor, groups: int, class_means: list[Tensor], class_vars: list[Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """Per layer (mean (G, ch), var (G, ch)): moments of each group's mix of classes, from per-class moments
    ``class_means[i]``/``class_vars[i]`` (n_classes, ch) of layer i; float32 on the labels' device."""
    if len(class_means) != len(layers):
        raise ValueError(f"class memory holds statistics of {len(class_means)} layers, the teacher has {len(layers)}")
    freq = sl.label_frequencies(labels, groups, class_means[0].shape[0] if class_means else 1)  # (G, n_classes)
    out = []
    for layer, means, variances in zip(layers, class_means, class_vars):
        if means.shape[1] != layer.num_features:
            raise ValueError(f"stored statistics have {means.shape[1]} channels, {layer} has {layer.num_features}")
        m, v = sl.mixture_moments(freq, means.to(labels.device), variances.to(labels.device))
        out.append((m.float(), v.float()))
    return out


def loss_weights(cfg: Config) -> LossWeights:
    return LossWeights(cfg.main_loss_multiplier, cfg.r_feature, cfg.first_bn_multiplier, cfg.tv_l2, cfg.l2)


def pixel_adam(x: Tensor, cfg: Config) -> torch.optim.Adam:
    """Adam on the pixels ``x``; under ``compile: graphs`` its lr is a 0-d float64 tensor (``set_lr`` fills it, a
    captured iteration reads it; on a CPU the steps equal a float lr's bit for bit) and on CUDA it is capturable
    (its step count stays on the device)."""
    lr: float | Tensor = cfg.generation_lr
    capturable = False
    if cfg.compile == "graphs":
        lr, capturable = torch.tensor(cfg.generation_lr, dtype=torch.float64, device=x.device), x.is_cuda
        if x.is_cuda:
            torch._dynamo.mark_static_address(x)  # updated in place by the captured step: CUDA graphs keep its address
    return torch.optim.Adam([x], lr=lr, betas=(0.5, cfg.beta_2), eps=1e-8, capturable=capturable)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr: in place when it is a tensor (read by a captured step), else replaced."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def keep_best(best: dict[str, Tensor], terms: Tensor, images: Tensor, it: Tensor) -> None:
    """Replace in ``best`` (x (G*B, ...), terms (G, 5), it (G,)) each group whose total in ``terms`` (G, 5) is lower by
    ``images`` (G*B, ...) at iteration ``it`` (0-d)."""
    better = terms[:, -1] < best["terms"][:, -1]  # (G,)
    best["terms"] = torch.where(better[:, None], terms, best["terms"])
    best["it"] = torch.where(better, it, best["it"])
    rows = better.repeat_interleave(len(images) // len(better))[:, None, None, None]  # (G*B, 1, 1, 1)
    best["x"] = torch.where(rows, images, best["x"])


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
    """Optimise G groups together: kept images (G*B, ...), their terms (G, 5), iteration (G,), last loss (G,).

    One iteration (loss, input gradient, keeping the best iterate, Adam step, clamp) is a function of tensors only,
    so that ``compile: graphs`` captures it whole (``precision.capture_step``)."""
    g, b = shifts.shape[1], len(y) // shifts.shape[1]
    x = x0.clone().requires_grad_(True)
    optimizer = pixel_adam(x, cfg)
    best = {
        "x": x0.clone(),
        "terms": torch.full((g, len(LOSS_TERMS)), float("inf"), device=x.device),
        "it": torch.zeros(g, dtype=torch.long, device=x.device),
    }
    iterations = torch.arange(cfg.syn_iterations + 1, device=x.device)  # (T+1,) the index of each, as tensors
    weights = loss_weights(cfg)
    loss_fn = precision.compile_function(sl.impression_loss, cfg, x.device)

    def augment(images: Tensor, shift: Tensor, flip: Tensor) -> Tensor:
        x5 = images.reshape(g, b, *images.shape[1:])  # (G, B, C, H, W)
        return sl.jitter_flip(x5, shift, flip) if cfg.jitter > 0 or cfg.do_flip else x5

    with capture_bn_inputs(layers) as store:

        def iteration(shift: Tensor, flip: Tensor, it: Tensor) -> Tensor:
            with precision.autocast(cfg, x.device):  # fp32: no autocast at all
                terms = loss_fn(
                    teacher, layers, store, augment(x, shift, flip), y, targets, weights, cfg.syn_fused_moments
                )
            (x.grad,) = torch.autograd.grad(terms[:, -1].sum(), x)
            if cfg.syn_keep == "best":
                keep_best(best, terms.detach(), x.detach(), it)  # the images this loss was measured on
            optimizer.step()
            with torch.no_grad():
                clamp_images_(x, cfg.syn_clamp)
            return terms.detach()

        step = precision.capture_step(iteration, cfg, x.device)
        for it in range(cfg.syn_iterations):
            set_lr(
                optimizer,
                sl.learning_rate(it, cfg.syn_iterations, cfg.generation_lr, cfg.syn_warmup, cfg.syn_cosine_factor),
            )
            terms = step(shifts[it], flips[it], iterations[it])
            bar.update(1)
            if (it + 1) % cfg.syn_log_every == 0 or it + 1 == cfg.syn_iterations:
                bar.set_postfix(dict(zip(LOSS_TERMS, terms.mean(dim=0).tolist())), refresh=False)
        with torch.no_grad(), precision.autocast(cfg, x.device):  # the last iterate is a candidate too
            terms = sl.impression_loss(teacher, layers, store, augment(x, shifts[-1], flips[-1]), y, targets, weights)
        keep_best(best, terms, x.detach(), iterations[-1])
    return best["x"], best["terms"], best["it"], terms[:, -1]


def _empty_result(x0: Tensor) -> SynthesisResult:
    none = torch.zeros(0)
    empty = ImageSet(x0.new_zeros((0, *x0.shape[1:])), torch.zeros(0, dtype=torch.long, device=x0.device))
    return SynthesisResult(empty, 0.0, dict.fromkeys(LOSS_TERMS, 0.0), none, none, none.long())


def synthesize(
    teacher: nn.Module,
    x0: Tensor,
    labels: Tensor,
    targets: list[tuple[Tensor, Tensor]],
    cfg: Config,
    shifts: Tensor,
    flips: Tensor,
    *,
    group_chunk: int | None = None,
    progress: bool = False,
) -> SynthesisResult:
    """Optimise G independent batches of impressions x0 (G*B, C, H, W) with ``labels`` (G*B,) against the frozen
    ``teacher``: its CE on the labels, the moments of its normalisation layers' inputs against ``targets`` (per
    layer (mean (G, ch), var (G, ch))), TV and L2 priors; ``shifts`` (T+1, G, 2) and ``flips`` (T+1, G) augment each
    evaluation. Batches are optimised ``group_chunk`` at a time in one tensor (default: all; 1 = a per-batch loop,
    identical up to float rounding). Keeps each batch's lowest-loss iterate. No files, ranks or logging.
    """
    if group_chunk is not None and group_chunk < 1:
        raise ValueError(f"group_chunk must be >= 1 or None, got {group_chunk}")
    n_groups, b = shifts.shape[1], cfg.syn_batch_size
    if len(labels) != n_groups * b or len(x0) != len(labels):
        raise ValueError(f"expected {n_groups} batches of {b} images and labels, got {len(x0)} and {len(labels)}")
    if n_groups == 0:
        return _empty_result(x0)
    layers = bn_layers(teacher)
    if not layers and cfg.r_feature > 0:
        raise ValueError("the teacher has no nn.BatchNorm2d layer to match moments on; set r_feature to 0")
    if len(targets) != len(layers):
        raise ValueError(f"got moment targets of {len(targets)} layers, the teacher has {len(layers)}")
    with eval_mode(teacher), torch.no_grad():
        logits_width = teacher_logits(teacher(x0[:1])).shape[1]
    if int(labels.max()) >= logits_width:
        raise ValueError(f"the teacher has {logits_width} outputs, fewer than the labels' {int(labels.max()) + 1}")
    chunk = min(group_chunk or n_groups, n_groups)
    outputs = []
    bar = tqdm(total=cfg.syn_iterations * -(-n_groups // chunk), desc="synthesis", disable=not progress, leave=False)
    with eval_mode(teacher), bar:
        for start in range(0, n_groups, chunk):
            stop = min(start + chunk, n_groups)
            sel = slice(start * b, stop * b)
            chunk_targets = [(m[start:stop], v[start:stop]) for m, v in targets]
            outputs.append(
                _optimise(
                    teacher, layers, x0[sel], labels[sel], shifts[:, start:stop], flips[:, start:stop],
                    chunk_targets, cfg, bar,
                )
            )  # fmt: skip
    images = torch.cat([o[0] for o in outputs])
    terms = torch.cat([o[1] for o in outputs])
    return SynthesisResult(
        images=ImageSet(images, labels),
        teacher_accuracy=teacher_accuracy(teacher, images, labels, batch_size=b * chunk),
        loss_terms=dict(zip(LOSS_TERMS, terms.mean(dim=0).tolist())),
        best_loss=terms[:, -1].cpu(),
        last_loss=torch.cat([o[3] for o in outputs]).cpu(),
        best_iteration=torch.cat([o[2] for o in outputs]).cpu(),
    )


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
