"""One call on a CUDA machine: correctness against the CPU, the CCSI BloodMNIST protocol, and bench/speed.py.

Runs on a bare CUDA machine's ``python3`` (torch, torchvision, numpy, matplotlib, scikit-learn, PyYAML, tqdm; no
medmnist, wandb, tensorboard or network needed). Stages, each stopped at its share of --budget_s (default 450 s,
so that the check ends within 8 minutes):
1. correctness (<= 90 s): one training step's gradients and a short digits CCSI run (2 tasks) on the CPU and on
   the device, in fp32 and with the fastest precision and syn_fused_moments (compile is left to stage 2), within
   the stated tolerances; on CUDA, 3 CCSI steps of task 2 under torch.cuda.set_sync_debug_mode("error") (no host
   sync inside a step);
2. protocol (<= 270 s): configs/bloodmnist/ccsi.yaml at the paper's settings with the fastest switches, on
   <repo>/data/bloodmnist.npz when present, else on a generated file in MedMNIST's .npz format with BloodMNIST's
   shapes (3x28x28 uint8, 8 classes, 11959/1712/3421 images), per-stage times (bench/protocol_timing.py); when
   stopped at the budget, the tasks completed so far;
3. speed (the rest): bench/speed.py on the device (reference, today, fastest).
Writes into --out DIR (default bench/results): gpu_check_<device>.md, whose first lines are the verdicts against
the targets (bench/gpu_check_report.py), its stages' own reports (_protocol.md, _speed.md) and the log (.log).
--cpu_short runs every stage on the CPU at tiny sizes, so that CI exercises the script in seconds.

Example:
    bash bench/gpu_check.sh --out /tmp/gpu_check              # on a CUDA machine (python3 bench/gpu_check.py too)
    .venv/bin/python bench/gpu_check.py --cpu_short --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval as engine
import models
from bench import protocol_timing, speed
from bench.gpu_check_report import header, protocol_verdict, speed_verdicts
from bench.report import publish
from bench.synthesis_speed import resolve_device
from experiment import config
from experiment.checkpoint import completed_tasks, load_checkpoint, task_checkpoint_path
from runtime import precision

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)
# ||g_dev - g_cpu|| / ||g_cpu|| over all parameters after one step from a random init (small, noisy gradients):
# fp32 allows TF32 convolutions on CUDA; bf16/fp16 measured on the CPU against fp32: 0.150 and 0.073.
STEP_TOLERANCE = {"fp32": 1e-2, "bf16": 0.25, "fp16": 0.15}
RUN_TOLERANCE = {"task 1": 3.0, "last task": 6.0}  # accuracy points; the README's Speed section says why
STAGE_SHARE = {"correctness": 90, "protocol": 270}  # seconds; speed gets the rest of the budget


class StageTimeout(Exception):
    """A stage used up its share of the budget."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in this (main) thread after ``seconds``."""

    def stop(_signum: int, _frame: Any) -> None:
        raise StageTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def step_gradients(device: torch.device, switch: str) -> dict[str, torch.Tensor]:
    """Gradients of one CE step of the CCSI ResNet (CN, cosine head) on a fixed random batch of 40."""
    cfg = speed.make_config(precision=switch)
    torch.manual_seed(0)
    net = models.build_net(cfg, 3, 32)
    net.expand_head(8)
    net = precision.prepare_model(net.to(device).train(), cfg, device)
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)  # (40, 3, 32, 32)
    with precision.autocast(cfg, device):
        loss = torch.nn.functional.cross_entropy(net(x)["logits"], (torch.arange(40) % 8).to(device))
    loss.backward()
    return {n: p.grad.float().cpu() for n, p in net.named_parameters() if p.grad is not None}


def run_accuracies(device: torch.device, switch: str, short: bool, work: Path, fused: bool = False) -> list[float]:
    """Accuracy after each task of a CCSI run in two tasks: digits (5 + 5 classes), or a tiny generated .npz;
    ``switch`` is the precision, ``fused`` sets syn_fused_moments."""
    values = {"nb_cl_fg": 5, "nb_cl": 5, "epochs": 3, "syn_iterations": 30, "nb_generation": 2, "progress": False}
    if short:  # 8 tinted classes, 8 training images each
        data = protocol_timing.write_fake_bloodmnist(work / "tiny.npz", n_train=64)
        values.update(dataset="npz", data_path=str(data), nb_cl_fg=4, nb_cl=4, epochs=1, syn_iterations=2)
        values.update(nb_generation=1, syn_batch_size=8)
    folder = work / f"{device.type}_{switch}{'_fused' if fused else ''}"
    values.update(device=device.type, precision=switch, syn_fused_moments=fused, output_dir=str(folder))
    cfg = engine.load_run_config([ROOT / "configs" / "digits" / "ccsi.yaml"], {**values, "overwrite": True})
    return engine.run(cfg)["accuracy_per_task"]


def correctness(device: torch.device, fast: str, short: bool, work: Path) -> list[str]:
    """Rows comparing the device with the CPU: gradients of one step and the accuracies of a short run."""
    cpu = torch.device("cpu")
    reference_grads, reference_acc = step_gradients(cpu, "fp32"), run_accuracies(cpu, "fp32", short, work / "cpu")
    rows = []
    for switch, fused in (("fp32", False), (fast, True)):
        label = switch + (" + syn_fused_moments" if fused else "")
        if not fused or switch != "fp32":  # the training step has no synthesis: fp32 is checked once
            grads = step_gradients(device, switch)
            a, b = (torch.cat([g[k].flatten() for k in reference_grads]) for g in (reference_grads, grads))
            diff = ((b - a).norm() / a.norm()).item()
            check = "training step: relative L2 gradient difference"
            rows.append(row(check, switch, "-", "-", diff, STEP_TOLERANCE[switch]))
        acc = run_accuracies(device, switch, short, work / device.type, fused)
        for name, i in (("task 1", 0), ("last task", -1)):
            gap = abs(acc[i] - reference_acc[i])
            cells = (f"{reference_acc[i]:.2f}", f"{acc[i]:.2f}")
            rows.append(row(f"CCSI run, accuracy after {name}", label, *cells, gap, RUN_TOLERANCE[name]))
    if device.type == "cuda":
        rows.append(sync_free_steps(device, work / "sync"))
    header = [
        "| check | switches | CPU fp32 | device | difference | tolerance | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    return header + rows


def sync_free_steps(device: torch.device, work: Path, steps: int = 3) -> str:
    """A row: ``steps`` CCSI steps of task 2 (the loader's next, before_step, the step, after_step) under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on a host sync; the epoch's preparation runs before."""
    args = speed.parse(["--quick"])  # 136 new images, 80 impressions
    common = {"method": "ccsi", "batch_size": args.batch, "idc_source": "train", "progress": False}
    common |= {"nb_generation": 1, "syn_batch_size": args.syn_images, "syn_iterations": 1, "syn_warmup": 1}
    method, ctx, training = speed.ccsi_at_task_2(speed.make_config(**common), args, device, work)
    method.train()
    method.on_epoch_start(ctx, 0)
    batches = iter(method.train_batches(ctx, 0))
    torch.cuda.synchronize(device)
    done, error = 0, ""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            batch = next(batches)
            training.step(method.before_step(batch), len(batch))
            method.after_step()
            done += 1
    except RuntimeError as err:
        error = str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check = "CCSI task-2 steps under set_sync_debug_mode('error'): host syncs"
    verdict = "ok" if not error else f"OUT OF TOLERANCE (step {done + 1}: {error})"
    return f"| {check} | fp32 | - | {done} of {steps} steps | {0 if not error else 1} | 0 | {verdict} |"


def row(check: str, switch: str, cpu: str, device: str, diff: float, tolerance: float) -> str:
    verdict = "ok" if diff <= tolerance else "OUT OF TOLERANCE"
    return f"| {check} | {switch} | {cpu} | {device} | {diff:.3g} | {tolerance:g} | {verdict} |"


def protocol(device: torch.device, fast: config.Config, short: bool, work: Path, out: Path) -> list[str]:
    """The CCSI BloodMNIST protocol with the fastest switches; its table, or the tasks done when stopped."""
    argv = ["--work", str(work), "--out", str(out), "--data_root", str(ROOT / "data")]
    argv += [f"--device={device.type}", "--progress=false"]
    argv += [f"--precision={fast.precision}", f"--compile={str(fast.compile).lower()}", "--syn_fused_moments=true"]
    if short:
        argv += ["--n_train", "64", "--epochs=1", "--syn_iterations=2", "--nb_generation=1", "--syn_batch_size=8"]
    start = time.perf_counter()
    try:
        protocol_timing.main(argv)
    except StageTimeout:
        done = completed_tasks(work / "run")
        if not done:
            return [f"stopped at the budget after {time.perf_counter() - start:.0f} s, before task 1 ended"]
        tasks = load_checkpoint(task_checkpoint_path(work / "run", done[-1]))["metrics"]["tasks"]
        cfg = engine.load_run_config([work / "run" / "config.yaml"])  # the run's own settings (epochs per task)
        table, _ = protocol_timing.task_table(cfg, [{"task": t["task"], **t["extra"]} for t in tasks])
        return [f"stopped at the budget after {time.perf_counter() - start:.0f} s; tasks done: {done}", "", *table]
    return out.read_text().splitlines()[2:]  # without its title


def speed_stage(device: torch.device, short: bool, out: Path) -> list[str]:
    argv = ["--device", device.type, "--out", str(out)]
    argv += ["--n", "40", "--epochs", "1", "--workers", "0", "--syn_groups", "2", "--syn_batch", "4"] if short else []
    argv += ["--syn_iterations", "2"] if short else ["--epochs", "1", "--syn_iterations", "30"]
    speed.main(argv)
    return out.read_text().splitlines()[2:]


def staged(name: str, seconds: float, fn: Callable[[], list[str]]) -> list[str]:
    """A stage's lines, or one line saying it was stopped at its budget or failed (the check goes on)."""
    start = time.perf_counter()
    try:
        with time_limit(seconds):
            lines = fn()
    except StageTimeout:
        lines = [f"{name}: stopped at its budget of {seconds:.0f} s"]
    except Exception as err:  # report the failure, run the other stages
        log.exception("stage %s failed", name)  # the traceback goes to the log file
        lines = [f"{name}: FAILED ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"]
    return [*lines, "", f"stage time: {time.perf_counter() - start:.1f} s", ""]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cpu_short", action="store_true", help="every stage on the CPU at tiny sizes (CI)")
    parser.add_argument("--budget_s", type=float, default=450.0, help="seconds for the three stages together")
    parser.add_argument("--work", default=str(ROOT / "runs/bench/gpu_check"), help="run folders (overwritten)")
    parser.add_argument("--out", default=str(ROOT / "bench/results"), help="folder of the report and the log")
    args = parser.parse_args(argv)
    device = resolve_device("cpu" if args.cpu_short else args.device)
    fast_precision, fast_compile = speed.FASTEST[device.type]
    fast = speed.make_config(precision=fast_precision, compile=fast_compile, syn_fused_moments=True)
    out = Path(args.out) / f"gpu_check_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out.with_suffix(".log"), mode="w")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        verdicts, sections = stages(device, fast, args, out)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    publish([*verdicts, "", *header(device, fast, args.cpu_short, args.budget_s, argv), *sections], out)
    return 1 if any("OUT OF TOLERANCE" in s or "FAILED" in s for s in sections) else 0


def stages(
    device: torch.device, fast: config.Config, args: argparse.Namespace, out: Path
) -> tuple[list[str], list[str]]:
    """The verdict lines, and the three stages' sections of the report."""
    work, start = Path(args.work), time.perf_counter()
    share = {k: v * args.budget_s / 450.0 for k, v in STAGE_SHARE.items()}
    checked = staged(
        "correctness", share["correctness"], lambda: correctness(device, fast.precision, args.cpu_short, work)
    )
    protocol_out = out.with_name(f"{out.stem}_protocol.md")
    timed = staged(
        "protocol", share["protocol"], lambda: protocol(device, fast, args.cpu_short, work / "protocol", protocol_out)
    )
    rest = max(args.budget_s - (time.perf_counter() - start), 30.0)
    measured = staged("speed", rest, lambda: speed_stage(device, args.cpu_short, out.with_name(f"{out.stem}_speed.md")))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    verdicts = speed_verdicts(measured, gpu is not None)
    verdicts.append(protocol_verdict(timed, gpu, paper=not args.cpu_short))
    itself = ["CPU against itself (--cpu_short): this checks the script, not a device.", ""] if args.cpu_short else []
    lines = ["## 1. Correctness: the device against the CPU", "", *itself, *checked]
    lines += ["## 2. CCSI BloodMNIST protocol, paper settings, fastest switches", "", *timed]
    lines += ["## 3. Speed: bench/speed.py", "", *measured, f"total: {time.perf_counter() - start:.1f} s"]
    return verdicts, lines


if __name__ == "__main__":
    sys.exit(main())
