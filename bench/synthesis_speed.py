"""Speed of class-impression synthesis: all batches in one tensor (vectorised) versus one batch at a time.

Builds the CCSI ResNet teacher (``models.build_net``, Continual Normalization) with random weights and
running statistics from random images on 3x32x32, stores per-class statistics of random images, then
times ``synthesize`` both ways in the same run on the same device and prints images x iterations per
second, their ratio and the largest difference between the two results. ``bench/speed.py`` reuses
``measure_synthesis``; ``describe_machine`` is shared by the benchmark scripts.

Example:
    .venv/bin/python bench/synthesis_speed.py --groups 8 --batch 40 --iterations 20 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import continual_class_specific_impression as ccsi
import models
from dataloaders.image_set import ImageSet
from experiment import config
from experiment.config import ConfigError
from methods.ccsi import synthesize_classes
from methods.class_statistics import ClassMemory
from runtime import distributed


def resolve_device(name: str) -> torch.device:
    """The engine's device choice; a bad choice ends the script with its one-line reason."""
    try:
        return distributed.resolve_device(name)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(device: torch.device | str | None = None) -> str:
    """One line: CPU model and cores, torch threads, torch version and, on CUDA, the GPU's name."""
    text = (
        f"CPU {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        text += f", GPU {torch.cuda.get_device_name(index)}"
    else:
        text += ", no CUDA GPU"
    return text


def build_teacher(cfg: config.Config, classes: int, device: torch.device) -> tuple[torch.nn.Module, ClassMemory]:
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
    memory = ClassMemory()
    memory.add_task(teacher, images, batch_size=128, device=device)
    return teacher, memory


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, synchronising CUDA before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or the process's peak RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size


def peak_memory(device: torch.device) -> str:
    """Peak memory since ``reset_peak``: CUDA max allocated, or the peak RSS of this process."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA max allocated)"
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
        return f"{int(line.split()[1]) / 1024:.0f} MiB peak RSS"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB max RSS since start"


@dataclass(frozen=True)
class Variant:
    """One way to run synthesis: all batches in one tensor or a per-batch loop, and the precision switches."""

    vectorised: bool = True
    chunk: int | None = None  # batches per tensor when vectorised (None: all)
    precision: str = "fp32"
    compile: bool | str = False  # the compile key: false, true or graphs
    fused_moments: bool = False  # syn_fused_moments


def measure_synthesis(
    groups: int, batch: int, iterations: int, classes: int, device: torch.device, variants: dict[str, Variant]
) -> dict[str, dict[str, Any]]:
    """Time ``synthesize`` once per variant (same teacher, seeds, device), after a 2-iteration warm-up each.

    Per variant: ``seconds``, ``warmup_s`` (first call: allocator, cuDNN autotuning, compilation), ``peak``
    (memory), ``images`` (the result) and ``teacher_accuracy``; ``work`` (images x iterations) is shared.
    """
    values = {
        **config.defaults(),
        "nb_generation": groups,
        "syn_batch_size": batch,
        "syn_iterations": iterations,
        "syn_warmup": min(100, iterations),
    }
    cfg = config.Config({k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()})
    teacher, memory = build_teacher(cfg, classes, device)
    out: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        conf = cfg.replace(precision=v.precision, compile=v.compile, syn_fused_moments=v.fused_moments)

        def run(c: config.Config, v: Variant = v) -> ccsi.SynthesisResult:
            group_chunk = v.chunk if v.vectorised else 1  # 1: one batch at a time, the per-batch loop
            return synthesize_classes(teacher, classes, (3, 32, 32), c, 0, device, memory, group_chunk=group_chunk)

        warm = conf.replace(syn_iterations=2)
        warmup_s, _ = timed(lambda c=warm: run(c))
        reset_peak(device)
        seconds, result = timed(lambda c=conf: run(c))
        out[name] = {"seconds": seconds, "warmup_s": warmup_s, "peak": peak_memory(device), "images": result.images.x}
        out[name]["teacher_accuracy"] = result.teacher_accuracy
        out[name]["work"] = float(groups * batch * iterations)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=8, help="batches synthesised (nb_generation)")
    parser.add_argument("--batch", type=int, default=40, help="images per batch (syn_batch_size)")
    parser.add_argument("--iterations", type=int, default=20, help="Adam steps (syn_iterations)")
    parser.add_argument("--classes", type=int, default=8, help="classes of the teacher")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--chunk", type=int, default=None, help="max_group_chunk of the vectorised run (default: all)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    variants = {"vectorised": Variant(chunk=args.chunk), "per-batch loop": Variant(vectorised=False)}
    m = measure_synthesis(args.groups, args.batch, args.iterations, args.classes, device, variants)
    print(f"machine: {describe_machine(device)}; device: {device}")
    print(
        f"setting: {args.groups} batches x {args.batch} images x {args.iterations} iterations, {args.classes} classes"
    )
    for name, r in m.items():
        print(f"{name}: {r['seconds']:8.2f} s  {r['work'] / r['seconds']:10.1f} images*iterations/s  {r['peak']}")
    vec, loop = m["vectorised"], m["per-batch loop"]
    print(f"speed-up (vectorised / loop): {loop['seconds'] / vec['seconds']:.2f}x")
    print(f"max |vectorised - loop| pixel difference: {(vec['images'] - loop['images']).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
