"""Run a wandb sweep file locally, with no wandb server, as a wandb agent would:

    python main.py sweep FILE [--dry-run] [--count=N] [--sweep-seed=S] [--resume] [--key=value ...]

- ``method: grid``: every combination of the parameters' ``values`` (in file order), up to ``run_cap``;
  ``method: random``: ``run_cap`` (or ``--count``) points, each parameter drawn independently as wandb's random
  search does (``values`` uniformly or with ``probabilities``; ``uniform``, ``int_uniform``, ``log_uniform_values``,
  ``log_uniform``, ``q_uniform``, ``normal``, ``log_normal``), reproducibly from ``--sweep-seed``;
  ``method: bayes`` needs the wandb server (refused).
- Each point runs the sweep's ``command`` (default ``${env} ${interpreter} ${program} ${args}``) with the macros
  the agent uses: ``${env}`` = /usr/bin/env, ``${interpreter}`` = the Python running this sweep (a wandb agent
  uses the first ``python`` on PATH instead: the shipped sweep files name the project's .venv/bin/python, which
  is checked once, before the first point, to import the project's requirements), ``${program}``, ``${args}`` =
  ``--key=value`` with Python's spelling of each value (True, [1, 2]), ``${args_no_hyphens}``,
  ``${args_no_boolean_flags}``, ``${envvar:NAME}``.
- ``--key=value`` or ``--key value`` after the file applies to every point (e.g. ``--epochs=1`` for a smoke test);
  each point gets its own run folder (the default ``output_dir`` names the run's config hash).
- Every point's configuration is checked before the first runs. A point whose result-changing keys equal an
  earlier point's is skipped with a line (e.g. a grid over ``eval_batch_size``). A finished point (its folder
  has metrics.json) or one running elsewhere (its lock is held) is skipped with a line, so an interrupted sweep
  continues when run again; a point stopped part-way is continued with ``--resume`` (``--resume=true``), else
  the sweep stops and says so.
A malformed file or a bad override is refused in one line (exit 2) before anything runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from experiment.config import Config, ConfigError
from experiment.errors import UserError
from experiment.identity import config_hash

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
    """The argument macros as the wandb agent builds them (Python's str of each value; None: a bare flag)."""
    return {
        "args": [f"--{k}" if v is None else f"--{k}={v}" for k, v in point.items()],
        "args_no_hyphens": [f"{k}" if v is None else f"{k}={v}" for k, v in point.items()],
        "args_no_boolean_flags": [
            f"--{k}" if isinstance(v, bool) else f"--{k}={v}" for k, v in point.items() if v is not False
        ],
    }


def build_command(sweep: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The command a wandb agent would run for one point."""
    interpreter = sweep.get("_interpreter", "python")  # main() sets the Python that runs the sweep
    macros = {"env": ["/usr/bin/env"], "interpreter": [interpreter], "program": [str(sweep["program"])]}
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

USAGE = "usage: python main.py sweep SWEEP_FILE [--dry-run] [--count=N] [--sweep-seed=S] [--resume] [--key=value ...]"
# What the project needs to import (requirements.txt); an interpreter named in the command is checked for them.
REQUIRED_MODULES = ("torch", "torchvision", "numpy", "yaml", "tqdm")
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def split_overrides(args: Sequence[str]) -> dict[str, str | None]:
    """``--key=value`` and ``--key value`` as name -> value (later ones win); a bare ``--flag`` maps to None (the
    run's own parsing makes it ``true`` for a bool key). Names are checked when each point's config is loaded."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}'; {USAGE}")
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, eq = args[i + 1], "="
            i += 1
        out[name.replace("-", "_")] = value if eq else None
        i += 1
    return out


def parse_args(argv: Sequence[str]) -> tuple[Path, bool, int | None, int, dict[str, str | None]]:
    """FILE, --dry-run, --count N, --sweep-seed S, then the overrides for every point (see split_overrides)."""
    argv = list(argv)
    if not argv or argv[0].startswith("--"):
        raise ConfigError(USAGE)
    dry_run, count, seed, rest = False, None, 0, []
    i = 1
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=")
        if arg == "--dry-run":
            dry_run = True
        elif arg.startswith("--") and name in ("count", "sweep-seed"):
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            if not value.isdigit() or (name == "count" and int(value) < 1):
                raise ConfigError(f"--{name} needs a {'positive ' if name == 'count' else ''}integer, got {value!r}")
            count, seed = (int(value), seed) if name == "count" else (count, int(value))
        else:
            rest.append(arg)
        i += 1
    return Path(argv[0]), dry_run, count, seed, split_overrides(rest)


def as_bool(name: str, value: str | None) -> bool:
    """A bool option of the sweep runner (bare: true)."""
    if value is None or value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ConfigError(f"--{name} is true or false, got {value!r}")


def named_interpreter(sweep: dict[str, Any]) -> str | None:
    """The interpreter a command names literally before ``${program}`` (e.g. .venv/bin/python); None for
    ``${interpreter}`` or a command without one."""
    parts = [str(p) for p in sweep.get("command", DEFAULT_COMMAND)]
    before = parts[: parts.index("${program}")] if "${program}" in parts else []
    named = [p for p in before if p not in ("${env}", "/usr/bin/env") and not p.startswith("${")]
    return named[-1] if named else None


def interpreter_problem(interpreter: str) -> str | None:
    """Why ``interpreter`` cannot run the project (missing, or a requirement it cannot import); None when it can."""
    probe = f"import {', '.join(REQUIRED_MODULES)}"
    try:
        done = subprocess.run([interpreter, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as err:
        return err.strerror or str(err)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def program_args(command: list[str], program: str) -> list[str] | None:
    """The arguments the command passes to ``program`` (main.py); None when it runs another program."""
    if Path(program).name != "main.py" or program not in command:
        return None
    return command[command.index(program) + 1 :]


def point_state(folder: Path | None) -> str:
    """'finished' (metrics.json written, no live run), 'unfinished' (task checkpoints but no metrics.json),
    'running' (its lock is held) or 'new'."""
    from tuning.best import running_owner

    if folder is None or not folder.is_dir():
        return "new"
    if running_owner(folder) is not None:
        return "running"
    if (folder / "metrics.json").exists():
        return "finished"
    if any(folder.glob("task_*.pt")):
        return "unfinished"
    return "new"


def planned_folder(cfg: Config) -> Path | None:
    """The run folder the point will write (as the engine names it), or None when it cannot be known yet (the
    checkpoint it continues from does not exist: an earlier task's sweep has not run)."""
    from experiment.checkpoint import TaskCheckpoint
    from experiment.run_folder import resolve_output_dir
    from tuning.best import resolve_saved_model_address

    try:
        parent_hash = None
        if cfg.saved_model_address is not None:
            with _quiet("tuning.best"):
                cfg = resolve_saved_model_address(cfg)
            parent_hash = TaskCheckpoint.load(cfg.saved_model_address).config_hash
        return resolve_output_dir(cfg, parent_hash)[0]
    except (UserError, OSError):
        return None


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence the info lines of logger ``name`` (the point's run prints them when it starts)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(argv: Sequence[str], load: Callable[[Sequence[str]], Config] | None = None) -> int:
    """Run the sweep ``argv`` names; ``load`` (main.py: the run's config from its arguments, every key declared)
    checks each point's configuration before anything runs, finds points that would compute the same thing, and
    names each point's folder (finished points are skipped; with --resume an unfinished one continues)."""
    path, dry_run, count, seed, overrides = parse_args(list(argv))
    resume = as_bool("resume", overrides.pop("resume")) if "resume" in overrides else False
    sweep = read_sweep(path)
    sweep["_interpreter"] = sys.executable
    commands = [build_command(sweep, {**point, **overrides}) for point in points(sweep, count, seed)]
    configs = []
    for i, cmd in enumerate(commands):
        args = None if load is None else program_args(cmd, str(sweep["program"]))
        with _quiet("experiment.config") if i else contextlib.nullcontext():  # the config's notes once
            configs.append(None if args is None else load(args))
    print(f"sweep {path}: {len(commands)} run(s) ({sweep.get('method', 'grid')})", flush=True)
    interpreter = named_interpreter(sweep)
    if not dry_run and interpreter is not None:
        problem = interpreter_problem(interpreter)
        if problem is not None:
            print(
                f"sweep: the command's interpreter {interpreter} cannot run the project ({problem}); install the "
                f"requirements there (pip install -r requirements.txt) or write ${{interpreter}} in the command to "
                f"use this one ({sys.executable})",
                file=sys.stderr,
            )
            return 2
    seen: dict[str, int] = {}
    for i, (cmd, cfg) in enumerate(zip(commands, configs, strict=True), 1):
        tag = f"[{i}/{len(commands)}]"
        if cfg is not None:
            key = config_hash(cfg.to_dict(), task=cfg.task, parent=cfg.saved_model_address)
            if key in seen:
                first = configs[seen[key] - 1].to_dict()
                other = sorted(k for k, v in cfg.to_dict().items() if first.get(k) != v and k != "output_dir")
                print(
                    f"{tag} skipped: the same run as point {seen[key]} (every result-changing key equal"
                    + (f"; differs only in {', '.join(other)})" if other else ")"),
                    flush=True,
                )
                continue
            seen[key] = i
            state = point_state(planned_folder(cfg))
            if state in ("finished", "running"):
                print(f"{tag} skipped: {planned_folder(cfg)} is {state}", flush=True)
                continue
            if state == "unfinished":
                if not resume:
                    print(
                        f"sweep: point {i} stopped part-way in {planned_folder(cfg)}; rerun the sweep with "
                        "--resume=true to continue it (finished points are skipped)",
                        file=sys.stderr,
                    )
                    return 2
                cmd = [*cmd, "--resume=true"]
        print(f"{tag} {shlex.join(cmd)}", flush=True)
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
