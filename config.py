"""Typed, validated run configuration with one flat namespace of keys.

Every key is declared once, next to the code that reads it, with ``register_options``:
its type, default, allowed values and a help line. A run's configuration is built from
YAML files (read by ``config_files.py``; later files override earlier ones, ``defaults:``
pulls in a base file) and command-line overrides (``--key=value`` as a wandb agent passes
them, or ``--key value``).
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` with one line that
names the key (and, for unknown keys, the closest valid one).

Per-task values (the original tunes some hyper-parameters per task) go in a ``per_task``
mapping of the YAML file: ``per_task: {2: {nb_generation: 16}, 3: {nb_generation: 24}}``;
``Config.for_task(t)`` returns the configuration in force during task ``t`` (1-based).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from config_files import read_config_file
from errors import ConfigError, writing

# Value kinds a key can have. "int_list" is a list of ints (e.g. class_order), written in YAML
# as a list or on the command line as "3,1,2" or "[3,1,2]".
KINDS = ("int", "float", "bool", "str", "int_list")


@dataclass(frozen=True)
class Option:
    """Declaration of one configuration key."""

    name: str
    kind: str  # one of KINDS
    default: Any
    help: str  # one line: meaning, units, paper value
    group: str = "general"
    choices: tuple[Any, ...] | None = None
    min: float | None = None  # bounds for numbers, inclusive unless min_exclusive
    max: float | None = None
    nullable: bool = False  # whether null/None is an accepted value
    min_exclusive: bool = False  # the value must be > min (a rate or a temperature of 0 makes no sense)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")
        if self.min_exclusive and self.min is None:
            raise ValueError(f"option {self.name}: min_exclusive needs a min")


OPTIONS: dict[str, Option] = {}

# Presets: a key whose value sets several other keys at once, unless the user set them explicitly
# (in a config file or on the command line). PRESETS[key][value] = {other_key: value, ...}.
PRESETS: dict[str, dict[Any, dict[str, Any]]] = {}

# YAML keys that are structure, not options.
_STRUCTURE_KEYS = ("defaults", "per_task")


def register_options(group: str, options: Iterable[Option]) -> None:
    """Declare configuration keys; a key name may be declared only once."""
    for opt in options:
        if opt.name in OPTIONS or opt.name in _STRUCTURE_KEYS:
            raise ValueError(f"configuration key {opt.name!r} is declared twice")
        opt = Option(**{**opt.__dict__, "group": group})
        coerce(opt, opt.default)  # the default itself must be valid
        OPTIONS[opt.name] = opt


def register_preset(key: str, values: dict[Any, dict[str, Any]]) -> None:
    """Declare that each value of ``key`` sets other keys (explicit settings win).

    Keys may be declared by modules imported later; ``load_config`` validates the settings.
    """
    if key in PRESETS:
        raise ValueError(f"preset {key!r} is declared twice")
    PRESETS[key] = values


def _closest(name: str) -> str:
    match = difflib.get_close_matches(str(name), list(OPTIONS), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _unknown_key(name: Any, where: str) -> ConfigError:
    return ConfigError(f"unknown configuration key '{name}' in {where}{_closest(name)}")


def _check_key(name: Any, where: str) -> None:
    if name not in OPTIONS:
        raise _unknown_key(name, where)


def few(items: Iterable[Any], limit: int = 5) -> str:
    """'a, b, c' for a short list; the first ``limit`` items and 'and N more' for a long one."""
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def coerce(opt: Option, value: Any) -> Any:
    """Return ``value`` converted to the option's kind, or raise ConfigError."""
    bad = ConfigError(
        f"key '{opt.name}': expected {opt.kind}"
        + (f" (one of {', '.join(map(str, opt.choices))})" if opt.choices else "")
        + f", got {value!r}"
    )
    if _is_null(opt, value):
        if opt.nullable:
            return None
        raise bad
    if opt.kind == "bool":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            out = value.lower() in ("true", "yes", "1", "on")
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        else:
            raise bad
    elif opt.kind == "int":
        if isinstance(value, str):
            value = _parse_scalar(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if isinstance(value, float) and not value.is_integer():
            raise bad
        out = int(value)
    elif opt.kind == "float":
        if isinstance(value, str):
            value = _parse_scalar(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"key '{opt.name}': must be a finite number, got {value}")
        out = float(value)
    elif opt.kind == "str":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise bad
        out = str(value)
    else:  # int_list
        if isinstance(value, str):
            text = value.strip().strip("[]")
            try:
                value = [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise bad from None
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        out = list(value)
    if opt.choices is not None and out not in opt.choices:
        raise bad
    if opt.kind in ("int", "float"):
        if opt.min is not None and (out <= opt.min if opt.min_exclusive else out < opt.min):
            raise ConfigError(f"key '{opt.name}': must be {'>' if opt.min_exclusive else '>='} {opt.min}, got {out}")
        if opt.max is not None and out > opt.max:
            raise ConfigError(f"key '{opt.name}': must be <= {opt.max}, got {out}")
    return out


def _is_null(opt: Option, value: Any) -> bool:
    """None, 'null' and '~' are null; 'none' too for a nullable key that has no 'none' choice."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    text = value.lower()
    return text in ("null", "~") or (text == "none" and opt.nullable and "none" not in (opt.choices or ()))


def _parse_scalar(text: str) -> Any:
    """A number written as text ('3', '1e-3', '0.5'); anything else is returned unchanged."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


class Config:
    """Resolved configuration: attribute access to every declared key, read-only."""

    def __init__(
        self,
        values: dict[str, Any],
        per_task: dict[int, dict[str, Any]] | None = None,
        pinned: set[str] | frozenset[str] = frozenset(),
    ):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_per_task", {int(k): dict(v) for k, v in (per_task or {}).items()})
        # keys set on the command line (or by replace): they win over per_task values too
        object.__setattr__(self, "_pinned", frozenset(pinned))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"no configuration key '{name}'{_closest(name)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use replace()")

    def __getstate__(self) -> dict[str, Any]:
        return {"values": self._values, "per_task": self._per_task, "pinned": self._pinned}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", state["values"])
        object.__setattr__(self, "_per_task", state["per_task"])
        object.__setattr__(self, "_pinned", state["pinned"])

    def __repr__(self) -> str:
        return f"Config({self._values!r})"

    @property
    def per_task(self) -> dict[int, dict[str, Any]]:
        return {k: dict(v) for k, v in self._per_task.items()}

    def replace(self, **changes: Any) -> Config:
        values = dict(self._values)
        for name, value in changes.items():
            if name not in OPTIONS:
                raise _unknown_key(name, "replace()")
            values[name] = coerce(OPTIONS[name], value)
        return Config(values, self._per_task, self._pinned | set(changes))

    def for_task(self, task: int) -> Config:
        """Configuration in force during ``task`` (1-based): per_task values, unless set on the command line."""
        task_values = {k: v for k, v in self._per_task.get(task, {}).items() if k not in self._pinned}
        return Config({**self._values, **task_values}, self._per_task, self._pinned)

    def to_dict(self) -> dict[str, Any]:
        out = dict(sorted(self._values.items()))
        if self._per_task:
            out["per_task"] = {k: dict(v) for k, v in sorted(self._per_task.items())}
        return out

    def save(self, path: str | Path) -> None:
        with writing(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def expand_path(key: str, raw: str) -> Path:
    """The path a path-valued key names: ``~`` and ``$VARIABLE`` expanded; an unset variable is a ConfigError."""
    text = os.path.expandvars(os.path.expanduser(raw))
    unset = re.search(r"\$(\w+|\{[^}]*\})", text)
    if unset:
        raise ConfigError(f"key '{key}': environment variable {unset.group(0)} is not set (in {raw!r})")
    return Path(text)


def defaults() -> dict[str, Any]:
    return {name: opt.default for name, opt in OPTIONS.items()}


def check_per_task(cfg: Config, num_tasks: int) -> None:
    """Refuse ``per_task`` entries for tasks the run does not have (known once the data set is loaded)."""
    beyond = sorted(t for t in cfg.per_task if t > num_tasks)
    if beyond:
        raise ConfigError(
            f"key 'per_task': entries for task(s) {few(beyond)}, but this run has {num_tasks} tasks; "
            "remove those entries or change the task split (nb_cl_fg, nb_cl)"
        )


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """Turn ``--key=value`` / ``--key value`` arguments into a mapping of raw strings."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}': overrides are written --key=value")
        body = arg[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '--{body}' has no value: write --{body}=VALUE")
            name, value = body, args[i + 1]
            i += 1
        name = name.replace("-", "_")
        if name not in OPTIONS:
            raise _unknown_key(name, "the command line")
        out[name] = value
        i += 1
    return out


def load_config(files: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> Config:
    """Build the validated config from defaults, YAML files (in order) and overrides."""
    values = defaults()
    per_task: dict[int, dict] = {}
    explicit = set(overrides or {})  # keys the user set; presets do not touch them
    for f in files:
        if not str(f).strip():
            raise ConfigError("--config needs a file name, got an empty one: --config configs/digits/ccsi.yaml")
        file_values, file_tasks = read_config_file(Path(f), _check_key)
        values.update(file_values)
        explicit |= set(file_values)
        for t, v in file_tasks.items():
            per_task.setdefault(t, {}).update(v)
    values.update(overrides or {})
    for key, table in PRESETS.items():
        chosen = coerce(OPTIONS[key], values[key])
        for name, setting in table.get(chosen, {}).items():
            if name not in OPTIONS:
                raise ValueError(f"preset {key}={chosen} sets undeclared key {name!r}")
            if name not in explicit:
                values[name] = setting
    values = {name: coerce(OPTIONS[name], v) for name, v in values.items()}
    per_task = {t: {n: coerce(OPTIONS[n], v) for n, v in vals.items()} for t, vals in per_task.items()}
    values["output_dir"] = _fill_placeholders(values["output_dir"], values)
    return Config(values, per_task, set(overrides or {}))


def _fill_placeholders(raw: str, values: dict[str, Any]) -> str:
    """``raw`` with each ``{key}`` replaced by that key's value (``output_dir: runs/{dataset}/seed{seed}``)."""
    try:
        return raw.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:
        reason = f"no configuration key {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(
            f"key 'output_dir': cannot fill the placeholders of {raw!r} ({reason}); write key names in braces, "
            "e.g. runs/{dataset}/seed{seed}, and {{ }} for literal braces"
        ) from None


def reference_table() -> str:
    """Markdown table of every key, grouped, for the README/docs."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    preset_notes = [
        f"- `{key}: {value}` sets " + ", ".join(f"`{n}: {v}`" for n, v in settings.items())
        for key, table in PRESETS.items()
        for value, settings in table.items()
    ]
    for group in sorted({o.group for o in OPTIONS.values()}, key=lambda g: (g != "run", g)):
        lines.append(f"| **{group}** | | | | |")
        for opt in sorted((o for o in OPTIONS.values() if o.group == group), key=lambda o: o.name):
            allowed = ""
            if opt.choices:
                allowed = " \\| ".join(map(str, opt.choices))
            elif opt.min is not None or opt.max is not None:
                low = "(" if opt.min_exclusive else "["
                allowed = f"{low}{'' if opt.min is None else opt.min}, {'' if opt.max is None else opt.max}]"
            if opt.nullable:
                allowed = (allowed + ", null").lstrip(", ")
            default = "null" if opt.default is None else opt.default
            lines.append(f"| `{opt.name}` | {opt.kind} | `{default}` | {allowed} | {opt.help} |")
    if preset_notes:
        lines += ["", "Presets (a key set explicitly, in a file or on the command line, wins over its preset):", ""]
        lines += preset_notes
    return "\n".join(lines)
