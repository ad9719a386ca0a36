"""What CCSI synthesis does to the impressions: loss terms, teacher accuracy and fidelity, per synthesis setting.

Loads the checkpoint of task t of a CCSI run (the teacher of task t+1 and its class memory), synthesises the
impressions of every seen class under each --variant (same seed) and prints per variant: the teacher's accuracy on
the initial and on the kept images, the CE and moment terms (unweighted) of both, the mean iteration kept, the mean
absolute pixel change, and the fidelity measured with the teacher's features against REAL test images of the seen
classes (a diagnostic only; no run reads them): ncm = accuracy of nearest-class-mean on the real images with
centroids from the impressions; spread = within-class feature spread of the impressions / of the real images.
Above the table, stale = per class, the moment loss of its REAL training images under the teacher against the
stored per-class targets (the targets' own error). ``stats=oracle`` in a variant matches the moments of the real
training images under the teacher instead of the stored ones (an upper bound, not data-free).

Example:
    .venv/bin/python bench/synthesis_diagnostics.py runs/ablation/ccsi/seed0/task_4.pt \
        --variant "base:" --variant "noflip:do_flip=false" --variant "running:class_stats=running,do_flip=false"
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import continual_class_specific_impression as cs
import dataloaders
import incremental_train_and_eval as engine
import models
import synthesis_losses as sl
from dataloaders.image_set import ImageSet, as_float
from experiment import config
from experiment.checkpoint import load_checkpoint
from methods import build_method
from methods.ccsi import synthesize_classes
from methods.class_statistics import ClassMemory, class_statistics


@torch.no_grad()
def features(net: torch.nn.Module, x: Tensor, batch: int = 500) -> Tensor:
    """L2-normalised features (N, D) of ``net`` in eval mode."""
    with sl.eval_mode(net):
        return torch.cat([F.normalize(net.features(x[i : i + batch]), dim=1) for i in range(0, len(x), batch)])


def spread(f: Tensor, y: Tensor, n: int) -> tuple[Tensor, float]:
    """Class centroids (n, D) and the mean distance of the samples to their centroid."""
    centroids = torch.stack([f[y == c].mean(0) for c in range(n)])
    return centroids, float((f - centroids[y]).norm(dim=1).mean())


@torch.no_grad()
def moment_error(teacher: torch.nn.Module, memory: ClassMemory, images: ImageSet, n: int, cfg) -> list[float]:
    """Per class: the weighted moment loss of its real images under ``teacher`` against its stored targets."""
    layers, errors = sl.bn_layers(teacher), []
    for c in range(n):
        x = as_float(images.x[images.y == c])
        y = torch.full((len(x),), c)
        targets = cs.class_mixture_targets(layers, y, 1, memory.layer_means, memory.layer_vars)
        with sl.eval_mode(teacher), sl.capture_bn_inputs(layers) as store:
            teacher(x)
            losses = [sl.moment_loss(*sl.group_moments(store[i], 1), m, v) for i, (m, v) in enumerate(targets)]
        errors.append(float(cfg.first_bn_multiplier * losses[0] + sum(losses[1:])))
    return errors


def oracle_memory(memory: ClassMemory, teacher: torch.nn.Module, train: ImageSet) -> ClassMemory:
    """A copy of ``memory`` whose moments are those of the REAL training images under ``teacher`` (not data-free)."""
    oracle = copy.deepcopy(memory)
    for i, (labels, mean, var) in enumerate(class_statistics(teacher, train, 500, "cpu")):
        rows = oracle.rows(labels)
        oracle.layer_means[i][rows], oracle.layer_vars[i][rows] = mean.to(oracle.layer_means[i]), var
    return oracle


def load(path: Path, overrides: dict[str, str]):
    """The run's configuration (with ``overrides``), data splits and method restored from a task checkpoint."""
    ckpt = load_checkpoint(path)
    saved = {k: v for k, v in ckpt["config"].items() if k in config.OPTIONS}
    cfg = engine.load_run_config([], {**saved, **overrides, "progress": "false", "device": "cpu"})
    splits, _ = dataloaders.prepare(cfg)
    net = models.build_net(cfg, splits.channels, splits.image_size)
    method = build_method(cfg, net, torch.device("cpu"))
    method.load_state_dict(ckpt["method"])
    return cfg, splits, method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--variant", action="append", default=[], help="'name:key=value,key=value' (stats=oracle)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg0, splits, method = load(args.checkpoint, {})
    teacher, memory = method.net.copy_frozen(), method.memory
    n = len(memory)
    test, train = splits.test.of_classes(list(range(n))), splits.train.of_classes(list(range(n)))
    f_real = features(teacher, as_float(test.x))
    _, real_spread = spread(f_real, test.y, n)
    stale = " ".join(f"{e:.1f}" for e in moment_error(teacher, memory, train, n, cfg0))
    print(f"{args.checkpoint}: {n} classes; real within-class spread {real_spread:.3f}; stale per class: {stale}")
    print("variant | teacher acc init/kept | ce init/kept | bn init/kept | kept it | |dx| | ncm init/kept | spread")
    shape = tuple(memory.mean_images.shape[1:])
    for text in args.variant or ["base:"]:
        name, _, body = text.partition(":")
        values = dict(item.split("=", 1) for item in body.split(",") if item)
        targets = oracle_memory(memory, teacher, train) if values.pop("stats", "stored") == "oracle" else memory
        cfg = cfg0.replace(**{k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()})
        init = synthesize_classes(teacher, n, shape, cfg.replace(syn_iterations=0), args.seed, "cpu", targets)
        kept = synthesize_classes(teacher, n, shape, cfg, args.seed, "cpu", targets)
        x0, x, y = init.images.x, kept.images.x, kept.images.y
        ncm0, ncm = (
            100.0 * float(((f_real @ spread(features(teacher, im), y, n)[0].t()).argmax(1) == test.y).float().mean())
            for im in (x0, x)
        )
        syn_spread = spread(features(teacher, x), y, n)[1]
        t0, t1 = init.loss_terms, kept.loss_terms
        print(
            f"{name} | {init.teacher_accuracy:.1f}/{kept.teacher_accuracy:.1f} | {t0['ce']:.3f}/{t1['ce']:.3f}"
            f" | {t0['bn']:.2f}/{t1['bn']:.2f} | {kept.best_iteration.float().mean():.1f}"
            f" | {(x - x0).abs().mean():.3f} | {ncm0:.1f}/{ncm:.1f} | {syn_spread / real_spread:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
