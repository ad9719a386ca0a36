"""Run a wandb sweep file locally, with no wandb server, as a wandb agent would:

    python main.py sweep FILE [--dry-run] [--count=N] [--sweep-seed=S] [--key=value ...]

- ``method: grid``: every combination of the parameters' ``values`` (in file order), up to ``run_cap``;
  ``method: random``: ``run_cap`` (or ``--count``) points, each parameter drawn independently as wandb's random
  search does (``values`` uniformly or with ``probabilities``; ``uniform``, ``int_uniform``, ``log_uniform_values``,
  ``log_uniform``, ``q_uniform``, ``normal``, ``log_normal``), reproducibly from ``--sweep-seed``;
  ``method: bayes`` needs the wandb server (refused).
- Each point runs the sweep's ``command`` (default ``${env} ${interpreter} ${program} ${args}``) with the macros
  the agent uses: ``${env}`` = /usr/bin/env, ``${interpreter}`` = python (the first on PATH, as the agent does:
  the shipped sweep files name the project's .venv/bin/python instead), ``${program}``, ``${args}`` =
  ``--key=value`` with Python's spelling of each value (True, [1, 2]), ``${args_no_hyphens}``,
  ``${args_no_boolean_flags}``, ``${envvar:NAME}``.
- ``--key=value`` after the file applies to every point (e.g. ``--epochs=1`` for a smoke test); each point gets its
  own run folder (the default ``output_dir`` names the run's config hash).
A malformed file is refused in one line (exit 2) before anything runs.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from experiment.config import ConfigError, parse_overrides

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
SEARCHES = ("grid", "random", "bayes")
DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values", "log_uniform", "q_uniform", "normal", "log_normal")
ENVVAR = re.compile(r"^\$\{envvar:([A-Za-z0-9_]+)\}$")


# ----- the file --------------------------------------------------------------------------------------------------


def read_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep file, checked: a mapping with program, parameters, a known method and a command list."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        sweep = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise ConfigError(f"sweep file {path} needs a non-empty 'parameters' mapping (wandb sweep format)")
    if not isinstance(sweep.get("program"), str):
        raise ConfigError(f"sweep file {path} needs 'program' (e.g. program: main.py)")
    method = sweep.get("method", "grid")
    if method not in SEARCHES:
        raise ConfigError(f"sweep file {path}: method must be one of {', '.join(SEARCHES)}, got {method!r}")
    command = sweep.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        raise ConfigError(f"sweep file {path}: 'command' must be a list of strings, got {command!r}")
    cap = sweep.get("run_cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise ConfigError(f"sweep file {path}: 'run_cap' must be a positive integer, got {cap!r}")
    for name, spec in sweep["parameters"].items():
        check_parameter(path, name, spec, method)
    return sweep


def check_parameter(path: Path, name: str, spec: Any, method: str) -> None:
    """One parameter: value, a non-empty list of values (with probabilities summing to 1), or a distribution."""
    where = f"sweep file {path}: parameter '{name}'"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{value: 1}} or {{values: [1, 2]}}, got {spec!r}")
    if "value" in spec:
        return
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: 'values' must be a non-empty list, got {values!r}")
        probs = spec.get("probabilities")
        if probs is not None and (len(probs) != len(values) or abs(sum(probs) - 1.0) > 1e-6):
            raise ConfigError(f"{where}: 'probabilities' must have one entry per value and sum to 1")
        return
    dist = spec.get("distribution")
    if dist is None:
        raise ConfigError(f"{where} needs 'value', 'values' or a 'distribution'")
    if method == "grid":
        raise ConfigError(f"{where}: a grid needs 'value' or 'values', not distribution {dist!r}; use method: random")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: distribution {dist!r} is not supported here; use one of {', '.join(DISTRIBUTIONS)}"
        )
    needed = ("mu", "sigma") if dist in ("normal", "log_normal") else ("min", "max")
    if any(k not in spec for k in needed):
        raise ConfigError(f"{where}: distribution {dist} needs {' and '.join(needed)}")


# ----- the points ------------------------------------------------------------------------------------------------


def grid_points(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, in file order."""
    names = list(parameters)
    choices = [[spec["value"]] if "value" in spec else list(spec["values"]) for spec in parameters.values()]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def draw(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a parameter for a random search."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    dist, lo, hi = spec["distribution"], spec.get("min"), spec.get("max")
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "log_uniform":  # min/max are natural logs
        return math.exp(rng.uniform(lo, hi))
    if dist == "q_uniform":
        q = spec.get("q", 1)
        return round(rng.uniform(lo, hi) / q) * q
    if dist == "normal":
        return rng.gauss(spec["mu"], spec["sigma"])
    return math.exp(rng.gauss(spec["mu"], spec["sigma"]))  # log_normal


def points(sweep: dict[str, Any], count: int | None, seed: int) -> list[dict[str, Any]]:
    """The runs of the sweep: the grid (up to run_cap / count), or ``count`` (else run_cap) random draws."""
    method, cap = sweep.get("method", "grid"), count or sweep.get("run_cap")
    if method == "bayes":
        raise ConfigError("method: bayes needs the wandb server (wandb sweep FILE, then wandb agent); "
                          "run grid or random locally")  # fmt: skip
    if method == "grid":
        grid = grid_points(sweep["parameters"])
        return grid[:cap] if cap else grid
    if not cap:
        raise ConfigError(
            "method: random runs until stopped under wandb; locally give run_cap or --count=N (runs to draw)"
        )
    rng = random.Random(seed)
    return [{name: draw(spec, rng) for name, spec in sweep["parameters"].items()} for _ in range(cap)]


# ----- the command -----------------------------------------------------------------------------------------------


def agent_args(point: dict[str, Any]) -> dict[str, list[str]]:
    """The argument macros as the wandb agent builds them (Python's str of each value)."""
    return {
        "args": [f"--{k}={v}" for k, v in point.items()],
        "args_no_hyphens": [f"{k}={v}" for k, v in point.items()],
        "args_no_boolean_flags": [
            f"--{k}" if isinstance(v, bool) else f"--{k}={v}" for k, v in point.items() if v is not False
        ],
    }


def build_command(sweep: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The command a wandb agent would run for one point."""
    macros = {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [str(sweep["program"])]}
    macros.update(agent_args(point))
    out: list[str] = []
    for part in (str(p) for p in sweep.get("command", DEFAULT_COMMAND)):
        envvar = ENVVAR.match(part)
        if envvar:
            out.append(os.environ.get(envvar.group(1), ""))
        elif part.startswith("${") and part.endswith("}"):
            if part[2:-1] not in macros:
                raise ConfigError(f"sweep command macro {part} is not supported by the local runner")
            out.extend(macros[part[2:-1]])
        else:
            out.append(part)
    return out


# ----- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[Path, bool, int | None, int, dict[str, str]]:
    """FILE, --dry-run, --count=N, --sweep-seed=S, then --key=value overrides for every point."""
    usage = "usage: python main.py sweep SWEEP_FILE [--dry-run] [--count=N] [--sweep-seed=S] [--key=value ...]"
    files = [a for a in argv if not a.startswith("--")]
    if len(files) != 1 or not argv or argv[0] != files[0]:
        raise ConfigError(usage)
    dry_run, count, seed, rest = False, None, 0, []
    for arg in argv[1:]:
        if arg == "--dry-run":
            dry_run = True
        elif arg.startswith(("--count=", "--sweep-seed=")):
            name, value = arg[2:].split("=", 1)
            if not value.isdigit() or (name == "count" and int(value) < 1):
                raise ConfigError(f"--{name} needs a {'positive ' if name == 'count' else ''}integer, got {value!r}")
            count, seed = (int(value), seed) if name == "count" else (count, int(value))
        else:
            rest.append(arg)
    return Path(files[0]), dry_run, count, seed, parse_overrides(rest)


def main(argv: Sequence[str]) -> int:
    path, dry_run, count, seed, overrides = parse_args(list(argv))
    sweep = read_sweep(path)
    commands = [build_command(sweep, {**point, **overrides}) for point in points(sweep, count, seed)]
    print(f"sweep {path}: {len(commands)} run(s) ({sweep.get('method', 'grid')})", flush=True)
    for i, cmd in enumerate(commands, 1):
        print(f"[{i}/{len(commands)}] {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        code = subprocess.call(cmd)
        if code != 0:
            print(f"sweep: run {i} exited with code {code}; stopping", file=sys.stderr)
            return code
    if not dry_run:
        from tuning.compare import sweep_table  # the points side by side: keys that differ, mean ± std over seeds

        print("\n" + sweep_table(commands), flush=True)
    return 0
