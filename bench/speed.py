"""CCSI's training step and a synthesis iteration, each three ways, timed as interleaved repeats in one run.

Training (images/s): CCSI's step of task 2 (the net's and the teacher's forwards, class-weighted cosine CE,
less-forget distillation, margin ranking, IdC on a second forward, SGD), 6 old classes replayed as synthetic
images mixed with 2 new classes' real ones (rs_ratio 0.66), generated 3x32x32 images (no download), one epoch
per timed repeat:
  reference  as the original code runs it: a torch DataLoader over a TensorDataset on the host (per-sample
             indexing, a WeightedRandomSampler for the real/synthetic mix, collate, ``.to(device)`` per batch),
             the IdC batch from a second DataLoader, the teacher run on every batch; fp32;
  today      the engine's epoch (training/task_training.py ``train_epoch``): CCSI's batches (BatchLoader on the
             device, the epoch's draws made when it starts), its teacher cache and its step; fp32, eager;
  fastest    today with --fast_precision and --fast_compile (precision.py);
  graphs     on CUDA: fastest's precision with compile graphs (the whole step captured as CUDA graphs).
Synthesis (images x iterations / s): reference = the per-batch loop with the released code's two-pass autograd
moments, today = ``synthesize`` as the engine calls it (CPU: one batch per tensor; GPU: all; one-pass fused
moments, ``syn_fused_moments`` true), two-pass = today with ``syn_fused_moments: false`` and, on a CPU, two batches
per tensor (the code before issue 27 item 4; target on a CPU: today >= 1.3x two-pass), fastest = today with the
switches, graphs (CUDA) = fastest with compile graphs (the whole iteration captured).
Each pipeline is warmed up first (timed apart: allocator, caches, compilation); then --repeats rounds each run
every pipeline once, in turn, so a change in the machine's load touches all of them; min and median per pipeline
and their ratios are printed, with the peak memory and the machine, and the table is written to --out.

Example:
    .venv/bin/python bench/speed.py --quick                 # < 2 min on a 2-core CPU
    .venv/bin/python bench/speed.py --device cuda           # full sizes
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval  # noqa: F401  (declares every configuration key)
import models
from bench.report import publish
from bench.synthesis_speed import (
    Variant,
    build_teacher,
    describe_machine,
    peak_memory,
    reset_peak,
    resolve_device,
    timed,
)
from continual_class_specific_impression import default_group_chunk
from dataloaders.batches import WHOLE_BATCH
from dataloaders.image_set import ImageSet, as_float
from experiment import config
from methods import losses
from methods.base import TaskContext
from methods.ccsi import CCSI, synthesize_classes
from runtime import precision
from training.optimization import build_optimizer
from training.task_training import ModelSelector, TaskTraining, capture_steps, train_epoch

CLASSES, OLD = 8, 6  # task 2 of CCSI: 6 old classes (impressions), 2 new (real images)
TRAIN_TARGET, SYNTHESIS_TARGET = 5.0, 10.0  # speed-ups over the reference wanted on a GPU
# The fastest switches per device (README, Speed): on this project's AVX2 CPU bf16/fp16 are ~14x slower and
# compiling costs minutes for 1.05-1.3x, so fp32 eager; on a GPU bf16 + compile (CUDA graphs). Both: synthesis
# with syn_fused_moments (equal up to float rounding).
FASTEST = {"cpu": ("fp32", False), "cuda": ("bf16", True)}
PIPELINES = ("reference", "today", "fastest")
SYNTHESIS_PIPELINES = ("reference", "two-pass", "today", "fastest")
BEFORE_CPU_CHUNK = 2  # batches per tensor on a CPU before issue 27 (CPU_GROUP_CHUNK at 2b9805c)
MOMENTS_TARGET = 1.3  # synthesis today / two-pass (the code before issue 27 item 4) on a CPU


def make_images(n: int, classes: list[int], seed: int) -> ImageSet:
    """n random 3x28x28 uint8 images zero-padded to (n, 3, 32, 32), labels (n,) cycling over ``classes``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
    return ImageSet(torch.nn.functional.pad(x, (2, 2, 2, 2)), torch.tensor(classes)[torch.arange(n) % len(classes)])


def make_config(**overrides: object) -> config.Config:
    values = {**config.defaults(), "backbone": "ccsi_resnet", "norm": "cn", "head": "cosine", **overrides}
    return config.Config({k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()})


def ccsi_at_task_2(cfg: config.Config, args: argparse.Namespace, device: torch.device, out: Path) -> tuple:
    """A CCSI method ready for task 2's steps (task 1 untrained: its statistics, then task 2's impressions),
    its task context and the engine's TaskTraining (optimiser, precision)."""
    torch.manual_seed(0)
    net = precision.prepare_model(models.build_net(cfg, 3, 32).to(device), cfg, device)
    method = CCSI(cfg, net, device)
    old = make_images(args.n_old, list(range(OLD)), 1).to(device)
    new = make_images(args.n, list(range(OLD, CLASSES)), 2).to(device)
    for task, (n_old, train) in enumerate([(0, old), (OLD, new)], start=1):
        classes = sorted(set(train.y.tolist()))
        g = torch.Generator().manual_seed(task)
        ctx = TaskContext(task, classes, n_old, train, train, None, device, out, g)
        method.begin_task(ctx, cfg)
        if task == 1:
            method.end_task(ctx)
    params = [p for p in method.net.parameters() if p.requires_grad]
    opt = build_optimizer([{"params": params}], cfg)
    training = TaskTraining(opt, params, None, ModelSelector(False, 1), [], precision.grad_scaler(cfg, device))
    capture_steps(method, training, cfg)
    return method, ctx, training


def reference_epoch(method: CCSI, ctx: TaskContext, training: TaskTraining, workers: int) -> None:
    """One epoch of CCSI's step as the original code feeds it: host datasets, per-sample DataLoaders, a copy of
    every batch to the device, the teacher on every batch (the same losses as ``CCSI.training_step``)."""
    cfg, device, net, teacher = method.cfg, method.device, method.net, method.teacher
    assert method.synthetic is not None and method.idc is not None and method.idc_pool is not None
    real, syn = ctx.train, method.synthetic
    x = torch.cat([as_float(real.x), syn.x.float()]).cpu()  # (N, C, H, W): the images as ToTensor gives them
    y = torch.cat([real.y, syn.y]).cpu()
    r = cfg.rs_ratio  # each row's chance: a fraction r of the draws is synthetic
    share = torch.cat([torch.full((len(real),), (1 - r) / len(real)), torch.full((len(syn),), r / len(syn))])
    epoch = round(len(real) / (1.0 - cfg.rs_ratio))
    g = torch.Generator().manual_seed(0)
    sampler = WeightedRandomSampler(share.double(), epoch, replacement=True, generator=g)
    loader = DataLoader(TensorDataset(x, y), cfg.batch_size, sampler=sampler, num_workers=workers)
    pool = TensorDataset(as_float(method.idc_pool.x).cpu())
    idc = iter(DataLoader(pool, cfg.batch_size, sampler=RandomSampler(pool, True, epoch, generator=g)))
    method.train()
    method.idc.reset()
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)  # (B, C, H, W), (B,)
        target = next(idc)[0].to(device)
        with precision.autocast(cfg, device):
            out = net(xb)
            with torch.no_grad():
                ref = teacher(xb)["features"]  # (B, D)
            loss = (
                losses.weighted_cross_entropy(out["logits"], yb, method.class_weights, WHOLE_BATCH)
                + losses.less_forget(out["features"], ref, method.lamda_t)
                + cfg.lw_mr * losses.margin_ranking(out["scores"], yb, OLD, cfg.K, cfg.dist, WHOLE_BATCH)
                + cfg.da_coef * method.idc(out["scores"], yb, net(target)["scores"], WHOLE_BATCH)
            )
        training.opt.zero_grad(set_to_none=True)
        precision.scale_loss(loss, training.scaler).backward()
        precision.optimizer_step(training.opt, training.scaler)


def interleaved(
    runs: dict[str, Callable[[], Any]], warmups: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Each run's warm-up, then ``repeats`` rounds that time every run once, in turn: per run ``times`` (s),
    ``min``, ``median``, ``warmup_s``, ``peak`` (memory over its timed repeats) and its last ``result``."""
    out = {name: {"times": [], "warmup_s": timed(warmups[name])[0], "peak": ""} for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            reset_peak(device)
            seconds, result = timed(fn)
            out[name]["times"].append(seconds)
            out[name]["peak"], out[name]["result"] = peak_memory(device), result
    for r in out.values():
        r["min"], r["median"] = min(r["times"]), statistics.median(r["times"])
    return out


def measure_training(
    args: argparse.Namespace, device: torch.device, fast: config.Config, same: bool, graphs: config.Config | None
) -> dict:
    """CCSI task-2 epochs: reference, today, (unless the switches change nothing) fastest and (given ``graphs``)
    the captured step, interleaved."""
    common = {"method": "ccsi", "K": 1, "dist": 0.3, "batch_size": args.batch, "idc_source": "train"}
    common |= {"nb_generation": 1, "syn_batch_size": args.syn_images, "syn_iterations": 1, "syn_warmup": 1}
    with tempfile.TemporaryDirectory() as tmp:
        plain = ccsi_at_task_2(make_config(**common, progress=False), args, device, Path(tmp))
        fastest = plain if same else ccsi_at_task_2(fast.replace(**common, progress=False), args, device, Path(tmp))
        captured = None if graphs is None else ccsi_at_task_2(graphs.replace(**common), args, device, Path(tmp))
    epoch = {
        "reference": lambda e: reference_epoch(plain[0], plain[1], plain[2], args.workers),
        "today": lambda e: train_epoch(plain[0], plain[1], e, plain[2]),
    }
    if not same:
        epoch["fastest"] = lambda e: train_epoch(fastest[0], fastest[1], e, fastest[2])
    if captured is not None:
        epoch["graphs"] = lambda e: train_epoch(captured[0], captured[1], e, captured[2])
    counter = iter(range(10**9))  # train_epoch's epoch argument (CCSI reads none of it)
    runs = {name: (lambda fn=fn: [fn(next(counter)) for _ in range(args.epochs)]) for name, fn in epoch.items()}
    warmups = {name: (lambda fn=fn: fn(next(counter))) for name, fn in epoch.items()}  # compiles every batch shape
    out = interleaved(runs, warmups, args.repeats, device)
    if same:
        out["fastest"] = out["today"]
    images = args.epochs * round(args.n / (1.0 - plain[0].cfg.rs_ratio))
    for r in out.values():
        r["work"] = float(images)
    return out


def measure_synthesis(args: argparse.Namespace, device: torch.device, variants: dict[str, Variant]) -> dict:
    """``synthesize`` per variant (same teacher, seeds, device), warmed up with 2 iterations, interleaved."""
    values = {"nb_generation": args.syn_groups, "syn_batch_size": args.syn_batch}
    values |= {"syn_iterations": args.syn_iterations, "syn_warmup": min(100, args.syn_iterations)}
    cfg = make_config(**values)
    teacher, memory = build_teacher(cfg, CLASSES, device)
    runs, warmups = {}, {}
    for name, v in variants.items():
        conf = cfg.replace(precision=v.precision, compile=v.compile, syn_fused_moments=v.fused_moments)
        chunk = v.chunk if v.vectorised else 1  # 1: one batch at a time, the per-batch loop

        def run(c: config.Config, chunk: int | None = chunk) -> Any:
            return synthesize_classes(teacher, CLASSES, (3, 32, 32), c, 0, device, memory, group_chunk=chunk)

        warm = conf.replace(syn_iterations=2)
        runs[name] = lambda c=conf, run=run: run(c)
        warmups[name] = lambda c=warm, run=run: run(c)
    out = interleaved(runs, warmups, args.repeats, device)
    for r in out.values():
        r["work"] = float(args.syn_groups * args.syn_batch * args.syn_iterations)
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=2990, help="real images of task 2's new classes (BloodMNIST: ~2990)")
    parser.add_argument("--n_old", type=int, default=None, help="images of task 1 (its statistics only; default n/5)")
    parser.add_argument("--syn_images", type=int, default=None, help="impressions in task 2 (default: n/2, >= 12)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per timed repeat")
    parser.add_argument("--batch", type=int, default=40, help="training batch size (paper: 40)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the reference")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (min and median over them)")
    parser.add_argument("--syn_groups", type=int, default=16, help="synthesis batches (nb_generation)")
    parser.add_argument("--syn_batch", type=int, default=40, help="images per synthesis batch")
    parser.add_argument("--syn_iterations", type=int, default=50, help="synthesis iterations per timed repeat")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--fast_precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--fast_compile", choices=("auto", "true", "false"), default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; --quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: under two minutes on a 2-core CPU")
    parser.add_argument("--out", default=None, help="markdown table (default bench/results/speed_<device>.md)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats must be >= 3 (min and median of at least three), got {args.repeats}")
    if args.quick:
        args.n, args.n_old, args.syn_images, args.workers = 136, 60, 80, 0  # 400 rows: 10 steps an epoch
        args.epochs, args.syn_groups, args.syn_batch, args.syn_iterations = 1, 4, 40, 4
        args.threads = args.threads or 1  # a shared 2-core CPU: 2 OpenMP threads (or workers) stall each other
    args.n_old = args.n_old or max(12, args.n // 5)
    args.syn_images = args.syn_images or max(12, args.n // 2)
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
    graphs = fast.replace(compile="graphs", progress=False) if device.type == "cuda" else None  # CPU: eager
    training = measure_training(args, device, fast, same, graphs)
    chunk = default_group_chunk(device)
    variants = {
        "reference": Variant(vectorised=False),
        "two-pass": Variant(chunk=BEFORE_CPU_CHUNK if device.type == "cpu" else chunk),
        "today": Variant(chunk=chunk, fused_moments=True),
        "fastest": Variant(chunk=chunk, precision=fast_precision, compile=fast_compile, fused_moments=True),
    }
    if graphs is not None:
        variants["graphs"] = Variant(chunk=chunk, precision=fast_precision, compile="graphs", fused_moments=True)
    syn = measure_synthesis(args, device, variants)
    lines = report(args, argv, device, (fast, same), training, syn)
    publish(lines, Path(args.out or f"bench/results/speed_{device.type}.md"))
    return 0


def report(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    device: torch.device,
    fastest: tuple[config.Config, bool],
    training: dict[str, dict[str, Any]],
    syn: dict[str, dict[str, Any]],
) -> list[str]:
    """The markdown report: settings, one row per stage and pipeline (min, median), the ratios."""
    gpu = device.type == "cuda"
    fast, same = fastest
    switches = f"precision {fast.precision}, compile {str(fast.compile).lower()}"
    labels = {
        ("training", "reference"): f"reference: DataLoader over a TensorDataset, {args.workers} workers, "
        "per-batch .to(device), teacher every step; fp32",
        ("training", "today"): "today: train_epoch, BatchLoader on the device, teacher cache; fp32",
        ("training", "fastest"): f"fastest: today's, {switches}" + (" (= today: measured once)" if same else ""),
        ("synthesis", "reference"): "reference: per-batch loop, two-pass autograd moments; fp32",
        ("synthesis", "two-pass"): "two-pass: the code before issue 27 item 4: syn_fused_moments false"
        f"{', two batches per tensor' if not gpu else ''}; fp32",
        ("synthesis", "today"): "today: batches in one tensor (CPU: one per tensor), one-pass fused moments; fp32",
        ("synthesis", "fastest"): f"fastest: today's, {switches}, syn_fused_moments",
        ("training", "graphs"): f"graphs: today's, precision {fast.precision}, compile graphs (step captured)",
        ("synthesis", "graphs"): f"graphs: today's, precision {fast.precision}, compile graphs, syn_fused_moments",
    }
    units = {"training": "images/s", "synthesis": "images*iterations/s"}
    rows = []
    for stage, results in (("training", training), ("synthesis", syn)):
        ref = results["reference"]
        base = PIPELINES if stage == "training" else SYNTHESIS_PIPELINES
        for name in [*base, *(["graphs"] if "graphs" in results else [])]:
            r = results[name]
            speed = (ref["min"] / r["min"], ref["median"] / r["median"])
            throughput = f"{r['work'] / r['min']:.0f} {units[stage]}"
            rows.append((stage, name, r, throughput, speed))
    epoch = round(args.n / 0.34)
    lines = [
        f"# Speed benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {describe_machine(device)}; device: {device}",
        f"- command: `python bench/speed.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- training: CCSI task 2, {OLD} old classes as {args.syn_images} impressions + {args.n} real images of "
        f"{CLASSES - OLD} new classes (generated 3x32x32), rs_ratio 0.66: {epoch} rows an epoch, batch {args.batch}, "
        f"CCSI ResNet + CN + cosine head, SGD; {args.epochs} epoch(s) per repeat",
        f"- synthesis: {args.syn_groups} batches x {args.syn_batch} images x {args.syn_iterations} iterations a repeat",
        f"- {args.repeats} interleaved repeats per pipeline after a warm-up each; throughput from the min",
        f"- fastest switches: {switches}, syn_fused_moments (synthesis)",
        "",
        "| stage | pipeline | min s | median s | warm-up s | throughput | vs reference (min) | vs reference (median) "
        "| peak memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {s} | {labels[s, n]} | {r['min']:.3f} | {r['median']:.3f} | {r['warmup_s']:.2f} | {tp} | {v[0]:.2f}x "
        f"| {v[1]:.2f}x | {r['peak']} |"
        for s, n, r, tp, v in rows
    ]

    def verdict(ratio: float, target: float) -> str:
        return f"target on a GPU: >= {target:.0f}x" + (f", {'met' if ratio >= target else 'NOT met'}" if gpu else "")

    def ratios(results: dict[str, dict[str, Any]], name: str) -> tuple[float, float]:
        ref, r = results["reference"], results[name]
        return ref["min"] / r["min"], ref["median"] / r["median"]

    lines.append("")
    for stage, results, target in (("training", training, TRAIN_TARGET), ("synthesis", syn, SYNTHESIS_TARGET)):
        fast_min, fast_median = ratios(results, "fastest")
        today_min, today_median = ratios(results, "today")
        lines.append(
            f"{stage} speed-up (fastest / reference): {fast_min:.2f}x min, {fast_median:.2f}x median "
            f"({verdict(fast_min, target)}); today / reference {today_min:.2f}x min, {today_median:.2f}x median"
        )
        if "graphs" in results:
            graphs_min, graphs_median = ratios(results, "graphs")
            lines.append(f"{stage} graphs / reference: {graphs_min:.2f}x min, {graphs_median:.2f}x median")
    moments = syn["two-pass"]["min"] / syn["today"]["min"], syn["two-pass"]["median"] / syn["today"]["median"]
    met = "met" if moments[0] >= MOMENTS_TARGET else "NOT met"
    lines.append(
        f"synthesis today / two-pass (before item 4): {moments[0]:.2f}x min, {moments[1]:.2f}x median"
        + ("" if gpu else f" (target on a CPU: >= {MOMENTS_TARGET}x, {met})")
    )
    images = {name: r["result"].images.x for name, r in syn.items()}
    difference = (images["today"] - images["reference"]).abs().max()
    lines.append(
        f"max |today - reference| synthesis pixel difference: {difference:.2e};"
        " teacher accuracy on the impressions: "
        + ", ".join(f"{n} {r['result'].teacher_accuracy:.1f}%" for n, r in syn.items())
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
