"""Training and synthesis throughput of our pipeline versus a straightforward reference, measured in one run.

Training (images/s): the same CCSI ResNet (Continual Normalization, cosine head, 8 classes) and SGD step on the
same generated BloodMNIST-shaped images (3x28x28 uint8, zero-padded to 32x32; no download), fed two ways:
  ours       uint8 tensor on the device + BatchLoader: indexing, crop_flip augmentation on the batch tensor;
  reference  torch DataLoader over a Dataset of HWC uint8 arrays with per-sample torchvision transforms
             (ToTensor, RandomCrop(32, padding=4), RandomHorizontalFlip) in --workers worker processes.
Synthesis (images x iterations / s): CCSI synthesis vectorised vs a per-batch loop (bench/synthesis_speed.py).
Prints both with their ratios, peak memory and the machine, and writes the table to --out.

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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config
import models
from bench.report import publish
from bench.synthesis_speed import describe_machine, measure_synthesis, resolve_device, timed
from dataloaders.batches import BatchLoader
from dataloaders.image_set import ImageSet

CLASSES = 8
TRAIN_TARGET, SYNTHESIS_TARGET = 5.0, 10.0  # speed-ups wanted on a GPU


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


def train_seconds(batches: Iterable, epochs: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds for ``epochs`` passes of SGD steps over ``batches`` (after ``warmup`` untimed steps)."""
    torch.manual_seed(0)
    values = {**config.defaults(), "backbone": "ccsi_resnet", "norm": "cn", "head": "cosine"}
    net = models.build_net(config.Config({k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()}), 3, 32)
    net.expand_head(CLASSES)
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, 3, 32, 32), (B,)
        loss = torch.nn.functional.cross_entropy(net(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i, (x, y) in enumerate(batches):
        if i >= warmup:
            break
        step(x, y)

    def epochs_loop() -> None:
        for _ in range(epochs):
            for x, y in batches:
                step(x, y)

    return timed(epochs_loop)[0]


def peak_memory(device: torch.device) -> str:
    """Peak CUDA memory since the last reset, or the max RSS so far of this process and of its finished children."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA max allocated)"
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return f"{own:.0f} MiB max RSS (children: {children:.0f} MiB)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=11959, help="training images (BloodMNIST train: 11959)")
    parser.add_argument("--epochs", type=int, default=2, help="timed training epochs per pipeline")
    parser.add_argument("--batch", type=int, default=40, help="training batch size (paper: 40)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the reference")
    parser.add_argument("--syn_groups", type=int, default=16, help="synthesis batches (nb_generation)")
    parser.add_argument("--syn_batch", type=int, default=40, help="images per synthesis batch")
    parser.add_argument("--syn_iterations", type=int, default=50, help="timed synthesis iterations")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; --quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: under two minutes on a 2-core CPU")
    parser.add_argument("--out", default=None, help="markdown table (default bench/results/speed_<device>.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.syn_groups, args.syn_batch, args.syn_iterations = 4000, 1, 8, 40, 15
        args.threads = args.threads or 1  # a shared 2-core CPU: 2 OpenMP threads stall each other
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x, y = make_images(args.n)

    reset_peak(device)
    ours = BatchLoader(ImageSet(x.to(device), y.to(device)), args.batch, augment="crop_flip", device=device)
    t_ours = train_seconds(BatchPairs(ours), args.epochs, device)
    mem_ours = peak_memory(device)
    reset_peak(device)
    hwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # (N, 32, 32, 3) as image files decode
    reference = DataLoader(
        ArrayDataset(hwc, y.numpy()),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    t_ref = train_seconds(reference, args.epochs, device)
    mem_ref = peak_memory(device)
    reset_peak(device)
    syn = measure_synthesis(args.syn_groups, args.syn_batch, args.syn_iterations, CLASSES, device)
    mem_syn = peak_memory(device)  # CPU: max RSS so far
    mem_loop = ""
    if device.type == "cuda":
        mem_syn = f"{syn['vectorised_peak_bytes'] / 2**20:.0f} MiB (CUDA max allocated)"
        mem_loop = f"{syn['loop_peak_bytes'] / 2**20:.0f} MiB (CUDA max allocated)"

    images = args.n * args.epochs
    work = syn["work"]
    gpu = device.type == "cuda"

    def verdict(ratio: float, target: float) -> str:
        return f"target on a GPU: >= {target:.0f}x" + (f", {'met' if ratio >= target else 'NOT met'}" if gpu else "")

    lines = [
        f"# Speed benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {describe_machine(device)}; device: {device}",
        f"- command: `python bench/speed.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- training: {args.n} generated 3x28x28 images padded to 32x32, {CLASSES} classes, batch {args.batch}, "
        f"{args.epochs} timed epoch(s), CCSI ResNet + CN + cosine head, SGD",
        f"- synthesis: {args.syn_groups} batches x {args.syn_batch} images x {args.syn_iterations} iterations",
        "",
        "| stage | pipeline | seconds | throughput | peak memory |",
        "|---|---|---:|---:|---|",
        f"| training | ours: uint8 tensors + BatchLoader, crop_flip on the batch | {t_ours:.2f} | "
        f"{images / t_ours:.0f} images/s | {mem_ours} |",
        f"| training | reference: DataLoader, {args.workers} workers, per-sample torchvision transforms | "
        f"{t_ref:.2f} | {images / t_ref:.0f} images/s | {mem_ref} |",
        f"| synthesis | vectorised: all batches in one tensor | {syn['vectorised_s']:.2f} | "
        f"{work / syn['vectorised_s']:.0f} images*iterations/s | {mem_syn} |",
        f"| synthesis | per-batch loop | {syn['loop_s']:.2f} | {work / syn['loop_s']:.0f} images*iterations/s | "
        f"{mem_loop} |",
        "",
        f"training speed-up (ours / reference): {t_ref / t_ours:.2f}x ({verdict(t_ref / t_ours, TRAIN_TARGET)})",
        f"synthesis speed-up (vectorised / loop): {syn['loop_s'] / syn['vectorised_s']:.2f}x "
        f"({verdict(syn['loop_s'] / syn['vectorised_s'], SYNTHESIS_TARGET)})",
        f"max |vectorised - loop| pixel difference: {syn['max_diff']:.2e}",
    ]
    publish(lines, Path(args.out or f"bench/results/speed_{device.type}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
