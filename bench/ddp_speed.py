"""Multi-process speed-up: the same config launched with torchrun on 1, 2, ... processes (GPUs), per stage.

For each process count n it runs ``torchrun --standalone --nproc_per_node=n main.py --config FILE ...`` into
``<work>/n<n>`` and reads that run's metrics.json: training seconds and before-task seconds (CCSI synthesis)
summed over tasks, the wall time of the launch (start-up included), and the accuracies, so the table shows
both the speed-up over one process and how far the results moved. With several GPUs each process uses one;
on a CPU each uses ``OMP_NUM_THREADS`` threads (default 1).

Examples:
    .venv/bin/python bench/ddp_speed.py --nproc 1 2 4 --config configs/bloodmnist/ccsi.yaml --epochs=5 --device=cuda
    .venv/bin/python bench/ddp_speed.py --quick      # digits CCSI, 1 and 2 CPU processes, about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval as engine
from bench.report import publish
from bench.synthesis_speed import describe_machine
from experiment import config

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"epochs": "2", "syn_iterations": "10", "syn_warmup": "2", "device": "cpu"}


def launch(nproc: int, cfg_file: str, overrides: dict[str, str], folder: Path, threads: int) -> dict:
    """One torchrun launch; returns its wall seconds and per-stage seconds and accuracies from metrics.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "main.py"]
    cmd += ["--config", cfg_file, *(f"--{k}={v}" for k, v in overrides.items())]
    cmd += [f"--output_dir={folder}", "--overwrite=true", "--progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{nproc} process(es) failed (exit {proc.returncode}):\n" + "\n".join(tail))
    metrics = json.loads((folder / "metrics.json").read_text())
    tasks = metrics["tasks"]
    return {
        "nproc": nproc,
        "wall": wall,
        "training": sum(t["seconds_training"] for t in tasks),
        "before_task": sum(t["seconds_before_task"] for t in tasks),
        "aia": metrics["average_incremental_accuracy"],
        "last": metrics["last_accuracy"],
    }


def format_table(rows: list[dict]) -> list[str]:
    base = rows[0]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    lines = [
        "| processes | wall s (incl. start-up) | training s | speed-up | before tasks (synthesis) s | speed-up "
        "| avg inc acc | last acc |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            r["nproc"],
            f"{r['wall']:.1f}",
            f"{r['training']:.1f}",
            ratio(base["training"], r["training"]),
            f"{r['before_task']:.1f}",
            ratio(base["before_task"], r["before_task"]),
            f"{r['aia']:.2f}",
            f"{r['last']:.2f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    epilog = "--key=value: configuration overrides for every launch (python main.py keys lists them)"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, epilog=epilog)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts; the first is the base")
    parser.add_argument("--config", default="configs/digits/ccsi.yaml", help="config file of every launch")
    parser.add_argument("--work", default="runs/bench/ddp_speed", help="run folders <work>/n<processes>")
    parser.add_argument("--out", default=None, help="markdown table (default bench/results/ddp_speed_<device>.md)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"sized for a 2-core CPU: {QUICK}")
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = {**(QUICK if args.quick else {}), **engine.parse_run_overrides(extra)}
    except config.ConfigError as err:
        parser.error(str(err))
    if any(n < 1 for n in args.nproc):
        parser.error(f"--nproc values must be >= 1, got {args.nproc}")
    device = overrides.get("device", "auto")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_gpu and max(args.nproc) > torch.cuda.device_count():
        parser.error(f"--nproc {max(args.nproc)} needs as many GPUs; this machine has {torch.cuda.device_count()}")

    rows = []
    for n in args.nproc:
        print(f"launching {n} process(es) ...", flush=True)
        try:
            rows.append(launch(n, args.config, overrides, Path(args.work) / f"n{n}", args.threads))
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    device_type = "cuda" if on_gpu else "cpu"
    lines = [
        f"# Multi-process speed ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {describe_machine()}; processes on {device_type}, OMP_NUM_THREADS={args.threads} each",
        f"- command: `python bench/ddp_speed.py {shlex.join(argv)}`",
        f"- config: {args.config}; overrides: " + (" ".join(f"--{k}={v}" for k, v in overrides.items()) or "none"),
        "- speed-up: seconds of the first row / seconds of this row; training and synthesis from metrics.json",
        "",
        *format_table(rows),
    ]
    publish(lines, Path(args.out or f"bench/results/ddp_speed_{device_type}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
