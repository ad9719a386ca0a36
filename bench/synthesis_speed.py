"""Speed of class-impression synthesis: all batches in one tensor (vectorised) versus one batch at a time.

Builds the CCSI ResNet teacher (``models.build_net``, Continual Normalization) with random weights and
running statistics from random images on 3x32x32, stores per-class statistics of random images, then
times ``synthesize`` both ways in the same run on the same device and prints images x iterations per
second, their ratio and the largest difference between the two results.

Example:
    .venv/bin/python bench/synthesis_speed.py --groups 8 --batch 40 --iterations 20 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config
import continual_class_specific_impression as ccsi
import models
from dataloaders.image_set import ImageSet


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def build_teacher(cfg: config.Config, classes: int, device: torch.device) -> tuple[torch.nn.Module, ccsi.ClassMemory]:
    """Random CCSI ResNet teacher with running statistics of random images, and a class memory of random images."""
    torch.manual_seed(0)
    net = models.build_net(cfg, 3, 32)
    net.expand_head(classes)
    images = ImageSet(
        torch.randint(0, 256, (classes * 32, 3, 32, 32), dtype=torch.uint8), torch.arange(classes * 32) % classes
    )
    net.train()
    with torch.no_grad():
        for idx in torch.arange(len(images)).split(64):
            net(images.x[idx].float() / 255)
    teacher = net.copy_frozen().to(device)
    memory = ccsi.ClassMemory()
    memory.add_task(teacher, images, batch_size=128, device=device)
    return teacher, memory


def timed(fn) -> tuple[float, ccsi.SynthesisResult]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=8, help="batches synthesised (nb_generation)")
    parser.add_argument("--batch", type=int, default=40, help="images per batch (syn_batch_size)")
    parser.add_argument("--iterations", type=int, default=20, help="Adam steps (syn_iterations)")
    parser.add_argument("--classes", type=int, default=8, help="classes of the teacher")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--chunk", type=int, default=None, help="max_group_chunk of the vectorised run (default: all)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    values = {
        **config.defaults(),
        "nb_generation": args.groups,
        "syn_batch_size": args.batch,
        "syn_iterations": args.iterations,
        "syn_warmup": min(100, args.iterations),
    }
    cfg = config.Config({k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()})
    teacher, memory = build_teacher(cfg, args.classes, device)

    def run(vectorised: bool, conf: config.Config = cfg) -> ccsi.SynthesisResult:
        return ccsi.synthesize(
            teacher, memory, args.classes, conf, seed=0, device=device, progress=False,
            vectorised=vectorised, max_group_chunk=args.chunk,
        )  # fmt: skip

    warm = cfg.replace(syn_iterations=2)
    run(True, warm), run(False, warm)  # one-time costs (allocator, cuDNN autotuning) out of the timings
    t_vec, vec = timed(lambda: run(True))
    t_loop, loop = timed(lambda: run(False))

    work = args.groups * args.batch * args.iterations
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}")
    print(
        f"setting: {args.groups} batches x {args.batch} images x {args.iterations} iterations, {args.classes} classes"
    )
    print(f"vectorised: {t_vec:8.2f} s  {work / t_vec:10.1f} images*iterations/s")
    print(f"per-batch loop: {t_loop:8.2f} s  {work / t_loop:10.1f} images*iterations/s")
    print(f"speed-up (vectorised / loop): {t_loop / t_vec:.2f}x")
    print(f"max |vectorised - loop| pixel difference: {(vec.images.x - loop.images.x).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
