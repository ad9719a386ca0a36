"""Training and synthesis throughput: a reference pipeline, ours today, and ours with the fastest switches, in one run.

Training (images/s): the same CCSI ResNet (Continual Normalization, cosine head, 8 classes), SGD step and
generated BloodMNIST-shaped images (3x28x28 uint8, zero-padded to 32x32; no download), fed three ways:
  reference  torch DataLoader over a Dataset of HWC uint8 arrays with per-sample torchvision transforms
             (ToTensor, RandomCrop(32, padding=4), RandomHorizontalFlip) in --workers worker processes, fp32;
  today      uint8 tensor on the device + BatchLoader (indexing, crop_flip on the batch tensor), fp32, eager;
  fastest    today's pipeline with --fast_precision and --fast_compile (precision.py).
Synthesis (images x iterations / s): reference = the per-batch loop, today = ``synthesize`` as the engine calls it
(CPU: two batches per tensor; GPU: all), fastest = today with the switches. Compilation and other first-call
costs are timed apart (warm-up) and left out of the throughputs. Prints the table, the ratios with the GPU
targets, the peak memory of each stage and the machine, and writes the table to --out.

Example:
    .venv/bin/python bench/speed.py --quick                 # < 2 min on a 2-core CPU
    .venv/bin/python bench/speed.py --device cuda           # full sizes (BloodMNIST's 11959 training images)
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models
from bench.report import publish
from bench.synthesis_speed import (
    Variant,
    describe_machine,
    measure_synthesis,
    peak_memory,
    reset_peak,
    resolve_device,
    timed,
)
from continual_class_specific_impression import default_group_chunk
from dataloaders.batches import BatchLoader
from dataloaders.image_set import ImageSet
from experiment import config
from runtime import precision

CLASSES = 8
TRAIN_TARGET, SYNTHESIS_TARGET = 5.0, 10.0  # speed-ups over the reference wanted on a GPU
# The fastest switches per device (README, Speed): on this project's AVX2 CPU bf16/fp16 are ~14x slower and
# compiling costs minutes for 1.05-1.3x, so fp32 eager; on a GPU bf16 + compile (CUDA graphs). Both: synthesis
# with syn_fused_moments (equal up to float rounding).
FASTEST = {"cpu": ("fp32", False), "cuda": ("bf16", True)}


class ArrayDataset(Dataset):
    """HWC uint8 images with per-sample transforms: the usual torchvision recipe."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def make_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random 3x28x28 uint8 images zero-padded to (n, 3, 32, 32), and labels (n,) cycling over the classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
    return torch.nn.functional.pad(x, (2, 2, 2, 2)), torch.arange(n) % CLASSES


class BatchPairs:
    """A BatchLoader seen as (x, y) pairs, re-iterable like a DataLoader."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((b.x, b.y) for b in self.loader)


def make_config(**overrides: object) -> config.Config:
    values = {**config.defaults(), "backbone": "ccsi_resnet", "norm": "cn", "head": "cosine", **overrides}
    return config.Config({k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()})


def train(batches: Iterable, epochs: int, device: torch.device, cfg: config.Config) -> tuple[float, float, str]:
    """(seconds for ``epochs`` passes of SGD steps, warm-up seconds, peak memory of the timed passes).

    Warm-up: 3 steps, or one whole pass when compiling (every batch shape is compiled before timing).
    """
    torch.manual_seed(0)
    net = models.build_net(cfg, 3, 32)
    net.expand_head(CLASSES)
    net = precision.prepare_model(net.to(device).train(), cfg, device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = precision.grad_scaler(cfg, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, 3, 32, 32), (B,)
        with precision.autocast(cfg, device):
            loss = torch.nn.functional.cross_entropy(net(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        precision.scale_loss(loss, scaler).backward()
        precision.optimizer_step(opt, scaler)

    def passes(n: int, limit: int | None = None) -> None:
        for _ in range(n):
            for i, (x, y) in enumerate(batches):
                if limit is not None and i >= limit:
                    break
                step(x, y)

    warmup_s, _ = timed(lambda: passes(1, None if cfg.compile else 3))
    reset_peak(device)
    seconds, _ = timed(lambda: passes(epochs))
    return seconds, warmup_s, peak_memory(device)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=11959, help="training images (BloodMNIST train: 11959)")
    parser.add_argument("--epochs", type=int, default=2, help="timed training epochs per pipeline")
    parser.add_argument("--batch", type=int, default=40, help="training batch size (paper: 40)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the reference")
    parser.add_argument("--syn_groups", type=int, default=16, help="synthesis batches (nb_generation)")
    parser.add_argument("--syn_batch", type=int, default=40, help="images per synthesis batch")
    parser.add_argument("--syn_iterations", type=int, default=50, help="timed synthesis iterations")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--fast_precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--fast_compile", choices=("auto", "true", "false"), default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; --quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: under two minutes on a 2-core CPU")
    parser.add_argument("--out", default=None, help="markdown table (default bench/results/speed_<device>.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.syn_groups, args.syn_batch, args.syn_iterations = 4000, 1, 8, 40, 15
        args.threads = args.threads or 1  # a shared 2-core CPU: 2 OpenMP threads stall each other
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    fast_precision, fast_compile = FASTEST[device.type]
    fast_precision = fast_precision if args.fast_precision == "auto" else args.fast_precision
    fast_compile = fast_compile if args.fast_compile == "auto" else args.fast_compile == "true"
    fast = make_config(precision=fast_precision, compile=fast_compile, syn_fused_moments=True)
    precision.check(fast, device)
    same = fast_precision == "fp32" and not fast_compile  # fastest training = today's: measured once
    x, y = make_images(args.n)
    hwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # (N, 32, 32, 3) as image files decode
    reference = DataLoader(
        ArrayDataset(hwc, y.numpy()),
        args.batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    ours = BatchPairs(BatchLoader(ImageSet(x.to(device), y.to(device)), args.batch, augment="crop_flip", device=device))
    training = {"reference": train(reference, args.epochs, device, make_config())}
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    training["today"] = train(ours, args.epochs, device, make_config())
    training["fastest"] = training["today"] if same else train(ours, args.epochs, device, fast)
    chunk = default_group_chunk(device)
    variants = {
        "reference": Variant(vectorised=False),
        "today": Variant(chunk=chunk),
        "fastest": Variant(chunk=chunk, precision=fast_precision, compile=fast_compile, fused_moments=True),
    }
    syn = measure_synthesis(args.syn_groups, args.syn_batch, args.syn_iterations, CLASSES, device, variants)
    lines = report(args, argv, device, (fast, same), training, syn, workers)
    publish(lines, Path(args.out or f"bench/results/speed_{device.type}.md"))
    return 0


def report(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    device: torch.device,
    fastest: tuple[config.Config, bool],
    training: dict[str, tuple[float, float, str]],
    syn: dict[str, dict[str, Any]],
    workers: float,
) -> list[str]:
    """The markdown report: settings, one row per stage and pipeline, the ratios."""
    gpu = device.type == "cuda"
    fast, same = fastest
    switches = f"precision {fast.precision}, compile {str(fast.compile).lower()}"
    labels = {
        ("training", "reference"): f"reference: DataLoader, {args.workers} workers, per-sample torchvision transforms",
        ("training", "today"): "today: uint8 tensors + BatchLoader, crop_flip on the batch; fp32",
        ("training", "fastest"): f"fastest: today's pipeline, {switches}",
        ("synthesis", "reference"): "reference: per-batch loop; fp32",
        ("synthesis", "today"): "today: batches in one tensor (CPU: 2 per tensor); fp32",
        ("synthesis", "fastest"): f"fastest: today's, {switches}, syn_fused_moments",
    }
    images = args.n * args.epochs
    rows = []
    for name, (seconds, warmup, peak) in training.items():
        speed = training["reference"][0] / seconds
        rows.append(("training", name, seconds, warmup, f"{images / seconds:.0f} images/s", speed, peak))
    for name, r in syn.items():
        speed = syn["reference"]["seconds"] / r["seconds"]
        throughput = f"{r['work'] / r['seconds']:.0f} images*iterations/s"
        rows.append(("synthesis", name, r["seconds"], r["warmup_s"], throughput, speed, r["peak"]))
    lines = [
        f"# Speed benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {describe_machine(device)}; device: {device}",
        f"- command: `python bench/speed.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- training: {args.n} generated 3x28x28 images padded to 32x32, {CLASSES} classes, batch {args.batch}, "
        f"{args.epochs} timed epoch(s), CCSI ResNet + CN + cosine head, SGD",
        f"- synthesis: {args.syn_groups} batches x {args.syn_batch} images x {args.syn_iterations} iterations",
        f"- fastest switches: {switches}, syn_fused_moments (synthesis)"
        + (" (training: today's, measured once)" if same else ""),
        "",
        "| stage | pipeline | seconds | warm-up s | throughput | vs reference | peak memory |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {s} | {labels[s, n]} | {t:.2f} | {w:.2f} | {tp} | {v:.2f}x | {p} |" for s, n, t, w, tp, v, p in rows]

    def verdict(ratio: float, target: float) -> str:
        return f"target on a GPU: >= {target:.0f}x" + (f", {'met' if ratio >= target else 'NOT met'}" if gpu else "")

    train_ratio = training["reference"][0] / training["fastest"][0]
    syn_ratio = syn["reference"]["seconds"] / syn["fastest"]["seconds"]
    lines += [
        "",
        f"reference DataLoader workers: {workers:.0f} MiB max RSS",
        f"training speed-up (fastest / reference): {train_ratio:.2f}x ({verdict(train_ratio, TRAIN_TARGET)}); "
        f"today / reference {training['reference'][0] / training['today'][0]:.2f}x",
        f"synthesis speed-up (fastest / reference): {syn_ratio:.2f}x ({verdict(syn_ratio, SYNTHESIS_TARGET)}); "
        f"today / reference {syn['reference']['seconds'] / syn['today']['seconds']:.2f}x",
        f"max |today - reference| synthesis pixel difference: "
        f"{(syn['today']['images'] - syn['reference']['images']).abs().max().item():.2e}; teacher accuracy on the "
        "impressions: " + ", ".join(f"{n} {r['teacher_accuracy']:.1f}%" for n, r in syn.items()),
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
