"""The GPU check's report (bench/gpu_check.py): its verdicts against issue 27's targets, read from the lines its
stages report, and its header.

Each verdict is one line ``- <target>: MET | NOT MET | NOT MEASURED (<number and what it was measured on>)``;
they open the report.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision

from bench.speed import SYNTHESIS_TARGET, TRAIN_TARGET
from bench.synthesis_speed import describe_machine
from experiment import config

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("medmnist", "wandb", "tensorboard")  # not needed by the check; reported as present or not

PROTOCOL_TARGET_S = 180.0  # the CCSI BloodMNIST protocol at the paper's settings in under 3 minutes on one H100
STATES = ("MET", "NOT MET", "NOT MEASURED")
VERDICT = re.compile(r"^- (?P<target>.+): (?P<state>MET|NOT MET|NOT MEASURED) \((?P<detail>.+)\)$")
TARGETS = (
    f"training step >= {TRAIN_TARGET:.0f}x the reference pipeline",
    f"synthesis >= {SYNTHESIS_TARGET:.0f}x the reference pipeline",
    f"CCSI BloodMNIST protocol at the paper's settings in under {PROTOCOL_TARGET_S / 60:.0f} minutes on one H100",
)


def line(target: str, state: str, detail: str) -> str:
    if state not in STATES:
        raise ValueError(f"verdict state {state!r}; expected one of {STATES}")
    return f"- {target}: {state} ({detail})"


def _failure(lines: list[str], stage: str) -> str:
    """Why a stage gave no number: its stopped/FAILED line, else that its report lacked the number."""
    said = next((s for s in lines if s.startswith(f"{stage}: ")), None)
    return said or f"{stage} stage: no figure in its report"


def speed_verdicts(speed_lines: list[str], gpu: bool) -> list[str]:
    """Training and synthesis speed-ups (fastest / reference) from bench/speed.py's report lines."""
    out = []
    for stage, target, name in zip(("training", "synthesis"), (TRAIN_TARGET, SYNTHESIS_TARGET), TARGETS[:2]):
        pattern = re.compile(rf"^{stage} speed-up \(fastest / reference\): (\d+(?:\.\d+)?)x")
        found = next((m for m in map(pattern.match, speed_lines) if m), None)
        if found is None:
            out.append(line(name, "NOT MEASURED", _failure(speed_lines, "speed")))
            continue
        ratio = float(found.group(1))
        if not gpu:
            out.append(line(name, "NOT MEASURED", f"{ratio:.2f}x on the CPU; the target is for a GPU"))
        else:
            out.append(line(name, "MET" if ratio >= target else "NOT MET", f"{ratio:.2f}x in bench/speed.py, same run"))
    return out


def protocol_verdict(protocol_lines: list[str], gpu_name: str | None, paper: bool) -> str:
    """The protocol's wall time from bench/protocol_timing.py's lines (``total: S s``) or the point it was stopped
    at (``stopped at the budget after S s``). ``gpu_name``: None on the CPU; ``paper``: full size, paper settings."""
    name = TARGETS[2]
    text = "\n".join(protocol_lines)
    total = re.search(r"^total: (\d+(?:\.\d+)?) s", text, re.M)
    stopped = re.search(r"^stopped at the budget after (\d+) s(.*)$", text, re.M)
    generated = ", on a generated BloodMNIST-format file" if re.search(r"^- data: generated", text, re.M) else ""
    if total is None and stopped is None:
        return line(name, "NOT MEASURED", _failure(protocol_lines, "protocol"))
    if gpu_name is None or not paper:
        seconds = float(total.group(1) if total else stopped.group(1))
        why = "on the CPU" if gpu_name is None else "not at the paper's settings"
        return line(name, "NOT MEASURED", f"{seconds:.0f} s {why}, shortened{generated}")
    where = f"on {gpu_name}{generated}" + ("" if "H100" in gpu_name else "; the target names an H100")
    if total is not None:
        seconds = float(total.group(1))
        state = "MET" if seconds < PROTOCOL_TARGET_S else "NOT MET"
        return line(name, state, f"{seconds / 60:.2f} min = {seconds:.0f} s {where}")
    seconds = float(stopped.group(1))
    if seconds >= PROTOCOL_TARGET_S:  # stopped later than the target: not met, however far it got
        return line(name, "NOT MET", f"over {seconds:.0f} s {where}; stopped at its budget{stopped.group(2)}")
    return line(name, "NOT MEASURED", f"stopped at its budget after {seconds:.0f} s, before the end, {where}")


def importable(name: str) -> bool:
    """Whether ``name`` could be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def header(device: torch.device, fast: config.Config, short: bool, budget_s: float, argv: Sequence[str]) -> list[str]:
    """The report's title and settings (after the verdicts)."""
    sizes = "scaled down to 64 training images" if short else "11959/1712/3421 train/val/test images"
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in (torchvision, np))
    return [
        f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {describe_machine(device)}; device: {device}; Python {sys.version.split()[0]}, {versions}",
        "- optional packages (none needed): " + ", ".join(f"{p} {'yes' if importable(p) else 'no'}" for p in OPTIONAL),
        f"- command: `python bench/gpu_check.py {shlex.join(argv)}`",
        f"- protocol data: {ROOT / 'data' / 'bloodmnist.npz'} when present, else a generated file in MedMNIST's .npz "
        f"format with BloodMNIST's shapes (3x28x28 uint8, 8 classes; {sizes}); the stage's data line says which",
        f"- fastest switches: precision {fast.precision}, compile {str(fast.compile).lower()}, syn_fused_moments",
        f"- budget: {budget_s:.0f} s (correctness, protocol, speed)",
        "",
    ]
