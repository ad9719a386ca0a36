"""Run a wandb sweep file locally, with no wandb server: ``python main.py sweep FILE [--dry-run]``.

A grid sweep (``parameters`` with ``value`` or ``values``) is expanded into one run per point of
the grid, each launched with the sweep's ``command`` (default ``${env} ${interpreter} ${program}
${args}``) exactly as a wandb agent would, one after another. ``--dry-run`` prints the commands.
Sweeps with ``distribution`` parameters need a wandb server (``wandb sweep`` + ``wandb agent``).
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from config import ConfigError

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def read_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        sweep = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise ConfigError(f"sweep file {path} needs a 'parameters' mapping (wandb sweep format)")
    if "program" not in sweep:
        raise ConfigError(f"sweep file {path} needs 'program' (e.g. program: main.py)")
    return sweep


def grid_points(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, in file order."""
    names, choices = [], []
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ("value" in spec or "values" in spec):
            raise ConfigError(
                f"sweep parameter '{name}': the local runner needs 'value' or 'values' "
                "(distributions need a wandb server: wandb sweep FILE, then wandb agent)"
            )
        names.append(name)
        choices.append([spec["value"]] if "value" in spec else list(spec["values"]))
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def build_command(sweep: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The command a wandb agent would run for one point of the grid."""
    args = [f"--{k}={_format(v)}" for k, v in point.items()]
    out: list[str] = []
    for part in sweep.get("command") or DEFAULT_COMMAND:
        if part == "${env}":
            continue
        if part == "${interpreter}":
            out.append(sys.executable)
        elif part == "${program}":
            out.append(str(sweep["program"]))
        elif part == "${args}":
            out.extend(args)
        elif part == "${args_no_hyphens}":
            out.extend(a[2:] for a in args)
        else:
            out.append(str(part))
    return out


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    dry_run = "--dry-run" in argv
    files = [a for a in argv if a != "--dry-run"]
    if len(files) != 1 or files[0].startswith("--"):
        raise ConfigError("usage: python main.py sweep SWEEP_FILE [--dry-run]")
    sweep = read_sweep(files[0])
    commands = [build_command(sweep, p) for p in grid_points(sweep["parameters"])]
    for i, cmd in enumerate(commands, 1):
        print(f"[{i}/{len(commands)}] {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        code = subprocess.call(cmd)
        if code != 0:
            print(f"sweep: run {i} exited with code {code}; stopping", file=sys.stderr)
            return code
    return 0
