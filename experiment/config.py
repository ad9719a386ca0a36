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
import logging
import math
import os
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from experiment import protocols
from experiment.config_files import read_config_file
from experiment.errors import ConfigError
from experiment.files import write_text

log = logging.getLogger(__name__)

# Value kinds a key can have. "int_list" is a list of ints (e.g. class_order), written in YAML
# as a list or on the command line as "3,1,2" or "[3,1,2]".
KINDS = ("int", "float", "bool", "str", "int_list")
BOOL_WORDS = ("true", "yes", "1", "on", "false", "no", "0", "off")  # what a bool key accepts as text


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
    scope: str | None = None  # one of SCOPES; None: the group's scope given to register_options
    min_exclusive: bool = False  # the value must be > min (a rate or a temperature of 0 makes no sense)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"option {self.name}: unknown scope {self.scope!r}")
        if self.min_exclusive and self.min is None:
            raise ValueError(f"option {self.name}: min_exclusive needs a min")


# What a key's value means for a run's results and identity:
# - "run": how to run (folders, progress, logging, device); never part of a run's identity;
# - "experiment": what is learned and how the run is set up (data, split, model, method, seed, protocol); fixed
#   for a whole run: resuming a run or continuing another run's checkpoint needs the same value;
# - "task": a per-task hyper-parameter (lr, epochs, losses, synthesis); may be set under ``per_task`` and may
#   differ when one task continues from another run's checkpoint (the per-task sweeps tune these).
SCOPES = ("run", "experiment", "task")


OPTIONS: dict[str, Option] = {}


@dataclass(frozen=True)
class PresetSetting:
    """A value that a preset gives one key (see ``register_preset``)."""

    value: Any
    required: bool  # the chosen value cannot run with another: a user value that differs is refused
    announce: bool  # say on the console when the preset sets the key
    owner: str  # "key=value" of the preset, for messages


# Presets: a key whose value sets other keys, unless the user set them (in a config file or on the command line).
# PRESETS[key][value][other_key] = PresetSetting. Registered by the modules that own the other keys.
PRESETS: dict[str, dict[Any, dict[str, PresetSetting]]] = {}

# PRESET_BASES[key][value] = the value of ``key`` whose settings ``key: value`` starts from (register_preset_base).
PRESET_BASES: dict[str, dict[Any, Any]] = {}

# YAML keys that are structure, not options.
_STRUCTURE_KEYS = ("defaults", "per_task")


def register_options(group: str, options: Iterable[Option], scope: str = "experiment") -> None:
    """Declare configuration keys; a key name may be declared only once. ``scope`` (see SCOPES) applies to the
    options that do not set their own."""
    if scope not in SCOPES:
        raise ValueError(f"register_options({group!r}): unknown scope {scope!r}")
    for opt in options:
        if opt.name in OPTIONS or opt.name in _STRUCTURE_KEYS:
            raise ValueError(f"configuration key {opt.name!r} is declared twice")
        opt = Option(**{**opt.__dict__, "group": group, "scope": opt.scope or scope})
        coerce(opt, opt.default)  # the default itself must be valid
        OPTIONS[opt.name] = opt


def register_preset(
    key: str, value: Any, settings: dict[str, Any], *, required: bool = False, announce: bool = False
) -> None:
    """Declare that ``key: value`` sets the keys in ``settings`` unless the user set them explicitly.

    Several modules may add settings to the same ``key: value`` (each the keys it owns); a key may be set
    only once per preset. ``required``: ``value`` cannot run otherwise, so an explicit user value that
    differs is refused, and the setting wins over other presets. ``announce``: log a note when it applies.
    Keys may be declared by modules imported later; ``load_config`` validates the settings.
    """
    table = PRESETS.setdefault(key, {}).setdefault(value, {})
    for name, setting in settings.items():
        if name in table:
            raise ValueError(f"preset {key}={value} sets key {name!r} twice")
        table[name] = PresetSetting(setting, required, announce, f"{key}={value}")


def register_preset_base(key: str, value: Any, base: Any) -> None:
    """Declare that ``key: value`` sets what ``key: base`` sets, except the keys it sets itself (e.g. a protocol
    that changes two keys of another)."""
    PRESET_BASES.setdefault(key, {})[value] = base


def preset_settings(key: str, value: Any) -> dict[str, PresetSetting]:
    """Every key that ``key: value`` sets: its own settings over those of its base (owned by ``key=value``)."""
    own = PRESETS.get(key, {}).get(value, {})
    base = PRESET_BASES.get(key, {}).get(value)
    if base is None:
        return dict(own)
    inherited = {n: replace(s, owner=f"{key}={value}") for n, s in preset_settings(key, base).items()}
    return {**inherited, **own}


# Names users write for keys that are spelled otherwise here (the original's spellings are kept: lamda, temprature).
ALIASES = {
    "learning_rate": "lr",
    "lambda": "lamda",
    "temperature": "temprature",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "epoch": "epochs",
    "bs": "batch_size",
    "seeds": "seed",
    "data": "dataset",
    "out_dir": "output_dir",
    "output": "output_dir",
    "num_threads": "threads",
    "workers": "num_workers",
}


def closest_key(name: str) -> str | None:
    """The declared key a mistyped ``name`` most likely means: an alias, a close spelling, or the key sharing
    most of its ``_``-separated words; None when nothing is close."""
    name = str(name).replace("-", "_")
    if ALIASES.get(name) in OPTIONS:
        return ALIASES[name]
    match = difflib.get_close_matches(name, list(OPTIONS), n=1, cutoff=0.75)
    if match:
        return match[0]
    words = set(name.lower().split("_")) - {""}
    overlap = {key: len(words & set(key.lower().split("_"))) for key in OPTIONS}
    best = max(overlap.values(), default=0)
    if best and best * 2 >= len(words):
        return min((k for k, n in overlap.items() if n == best), key=lambda k: (len(k), k))
    match = difflib.get_close_matches(name, list(OPTIONS), n=1, cutoff=0.5)
    return match[0] if match else None


def _closest(name: str) -> str:
    match = closest_key(name)
    return f" (did you mean '{match}'?)" if match else ""


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
        elif isinstance(value, str) and value.lower() in BOOL_WORDS:
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
        if _bool_choice(opt, value):  # a choice that extends a former bool key: YAML's true/false, --key=True
            out = "true" if coerce(Option(opt.name, "bool", False, ""), value) else "false"
        elif isinstance(value, bool) or not isinstance(value, str | int | float):
            raise bad
        else:
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


def _bool_choice(opt: Option, value: Any) -> bool:
    """Whether ``value`` is a bool (or a bool word) given to a str key whose choices include "true" and "false"."""
    if opt.choices is None or not {"true", "false"} <= set(opt.choices):
        return False
    return isinstance(value, bool) or (isinstance(value, str) and value.lower() in BOOL_WORDS)


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
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def expand_path(key: str, raw: str) -> Path:
    """The path a path-valued key names: ``~`` and ``$VARIABLE`` expanded; an unset variable is a ConfigError."""
    text = os.path.expandvars(os.path.expanduser(raw))
    unset = re.search(r"\$(\w+|\{[^}]*\})", text)
    if unset:
        raise ConfigError(f"key '{key}': environment variable {unset.group(0)} is not set (in {raw!r})")
    check_path_names(key, Path(text))
    return Path(text)


NAME_MAX = 255  # bytes in one file or folder name on common file systems (ext4, xfs, btrfs, NFS)


def check_path_names(key: str, path: Path) -> None:
    """Refuse a path with a file or folder name longer than the file system allows (ENAMETOOLONG otherwise)."""
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            label = key if key.startswith("--") else f"key '{key}'"
            raise ConfigError(
                f"{label}: the name {shown!r} in it is {size} bytes long, more than the file system allows "
                f"({NAME_MAX}); choose a shorter name"
            )


def defaults() -> dict[str, Any]:
    return {name: opt.default for name, opt in OPTIONS.items()}


def _check_per_task_scopes(per_task: dict[int, dict[str, Any]]) -> None:
    """Refuse ``per_task`` entries for keys that hold for a whole run (scope "experiment" or "run")."""
    fixed = sorted({n for vals in per_task.values() for n in vals if OPTIONS[n].scope != "task"})
    if fixed:
        raise ConfigError(
            f"key 'per_task': {few(fixed)} cannot change from task to task (they hold for the whole run); "
            "set them at the top level of the config"
        )


def check_per_task(cfg: Config, num_tasks: int) -> list[int]:
    """Name, in one console note, the ``per_task`` entries for tasks the run does not have (known once the data
    set is loaded; e.g. a config written for 4 tasks run with another split): they are not used. Returns them."""
    beyond = sorted(t for t in cfg.per_task if t > num_tasks)
    if beyond:
        log.warning(
            "note: per_task entries for task(s) %s are not used: this run has %d tasks (nb_cl_fg, nb_cl)",
            few(beyond),
            num_tasks,
        )
    return beyond


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
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, value = body, args[i + 1]
            i += 1
        elif body.replace("-", "_") in OPTIONS and OPTIONS[body.replace("-", "_")].kind == "bool":
            name, value = body, "true"  # a bare --flag of a bool key means --flag=true
        else:
            if body.replace("-", "_") not in OPTIONS:
                raise _unknown_key(body.replace("-", "_"), "the command line")
            raise ConfigError(f"override '--{body}' has no value: write --{body}=VALUE")
        name = name.replace("-", "_")
        if name not in OPTIONS:
            raise _unknown_key(name, "the command line")
        out[name] = value
        i += 1
    return out


def _chosen_settings(values: dict[str, Any]) -> list[tuple[str, PresetSetting]]:
    """The settings of every preset whose key has its preset value in ``values``."""
    chosen = []
    for key in PRESETS:
        for name, setting in preset_settings(key, coerce(OPTIONS[key], values[key])).items():
            if name not in OPTIONS:
                raise ValueError(f"preset {setting.owner} sets undeclared key {name!r}")
            chosen.append((name, setting))
    return chosen


def _apply_presets(values: dict[str, Any], explicit: set[str], per_task: dict[int, dict]) -> None:
    """Set the keys the chosen presets set, unless explicit; refuse explicit values that break a requirement.

    Required settings win over other presets; two other presets that set one key differently are a bug.
    """
    settings = _chosen_settings(values)
    required = {name: s for name, s in settings if s.required}
    soft: dict[str, PresetSetting] = {}
    for name, s in settings:
        if s.required:
            continue
        other = soft.setdefault(name, s)
        if coerce(OPTIONS[name], other.value) != coerce(OPTIONS[name], s.value) and name not in required:
            raise ValueError(f"presets {other.owner} and {s.owner} set key {name!r} differently")
    for name, s in {**soft, **required}.items():
        wanted = coerce(OPTIONS[name], s.value)
        sources = [("", values)] + [(f" (per_task {t})", v) for t, v in per_task.items()]
        for where, table in sources:
            if (
                s.required
                and name in table
                and (where or name in explicit)
                and coerce(OPTIONS[name], table[name]) != wanted
            ):
                raise ConfigError(
                    f"key '{name}'{where}: {s.owner} needs {name}: {wanted}, got {table[name]!r}; "
                    f"remove the key or set it to {wanted}"
                )
        if name in explicit:
            continue
        if s.announce and coerce(OPTIONS[name], values[name]) != wanted:
            log.info("%s sets %s: %s (%s)", s.owner, name, wanted, "required" if s.required else "its default")
        values[name] = wanted


# Placeholders of output_dir besides the key names, filled when the run starts (run_folder.resolve_output_dir).
RUN_PLACEHOLDERS = ("config_hash", "task")


def _check_placeholders(template: str) -> None:
    """Refuse an output_dir whose ``{placeholder}`` is neither a key nor one of RUN_PLACEHOLDERS."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"key 'output_dir': {err} in {template!r}; write {{{{ }}}} for a literal brace") from None
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is not None and (spec or conversion):
            shown = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            raise ConfigError(
                f"key 'output_dir': placeholder {shown[:40]} has a format spec or conversion; write plain {{{field}}}"
            )
    for field in fields:
        if field not in OPTIONS and field not in RUN_PLACEHOLDERS:
            raise ConfigError(
                f"key 'output_dir': unknown placeholder {{{field}}} in {template!r}; use a key name, "
                + " or ".join(f"{{{p}}}" for p in RUN_PLACEHOLDERS)
            )


def load_config(files: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> Config:
    """Build the validated config from defaults, YAML files (in order) and overrides."""
    values = defaults()
    per_task: dict[int, dict] = {}
    for name in overrides or {}:
        _check_key(name, "the overrides")
    explicit = set(overrides or {})  # keys the user set; presets do not touch them
    for f in files:
        if not str(f).strip():
            raise ConfigError("--config needs a file name, got an empty one: --config configs/digits/ccsi.yaml")
        check_path_names("--config", Path(f))
        file_values, file_tasks = read_config_file(Path(f), _check_key)
        values.update(file_values)
        explicit |= set(file_values)
        for t, v in file_tasks.items():
            per_task.setdefault(t, {}).update(v)
    values.update(overrides or {})
    _apply_presets(values, explicit, per_task)
    values = {name: coerce(OPTIONS[name], v) for name, v in values.items()}
    per_task = {t: {n: coerce(OPTIONS[n], v) for n, v in vals.items()} for t, vals in per_task.items()}
    _check_per_task_scopes(per_task)
    _check_placeholders(str(values["output_dir"]))
    _note_unused_keys(values, explicit | {n for vals in per_task.values() for n in vals})
    return Config(values, per_task, set(overrides or {}))


# The rule for keys a method does not use: a key declared in a group named after a method (register_options("icarl",
# ...)) is read by that method only, or by the methods listed here; "synthesis" (the impression synthesis) is read
# by the methods that synthesise. Keys of other groups (train, data, memory, distillation...) are never flagged.
GROUP_USERS: dict[str, tuple[str, ...]] = {"lucir": ("lucir", "ccsi"), "synthesis": ("ccsi", "deepinversion")}


def group_users(group: str) -> tuple[str, ...] | None:
    """The methods that read the keys of ``group``; None when every method may read them."""
    methods = OPTIONS["method"].choices or () if "method" in OPTIONS else ()
    return GROUP_USERS.get(group, (group,) if group in methods else None)


def unused_keys(method: str, names: Iterable[str]) -> list[str]:
    """The keys among ``names`` that the chosen ``method`` never reads (see GROUP_USERS)."""
    return sorted(
        n
        for n in names
        if n in OPTIONS and (users := group_users(OPTIONS[n].group)) is not None and method not in users
    )


def _note_unused_keys(values: dict[str, Any], explicit: set[str]) -> None:
    """One console note naming the keys set (in a file or on the command line) that the chosen method ignores."""
    if "method" not in values:
        return
    unused = unused_keys(values["method"], explicit)
    if unused:
        owners = sorted({OPTIONS[n].group for n in unused})
        log.warning(
            "note: method %s does not use %s (keys of %s); they are ignored",
            values["method"],
            ", ".join(unused),
            ", ".join(owners),
        )


def _declare_protocols() -> None:
    """The ``protocol`` key and its presets, from the one table of configs/protocols.yaml."""
    table = protocols.load_table()
    meanings = "; ".join(f"{name} = {row.help}" for name, row in table.items())
    register_options(
        "run",
        [
            Option(
                "protocol",
                "str",
                protocols.DEFAULT,
                f"preset of the switches for the released CCSI code's behaviour (configs/protocols.yaml): {meanings}. "
                "Results state their protocol",
                choices=tuple(table),
            )
        ],
        scope="experiment",
    )
    for name, row in table.items():
        register_preset("protocol", name, row.settings)
        if row.base is not None:
            register_preset_base("protocol", name, row.base)


_declare_protocols()
