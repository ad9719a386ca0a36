"""Reading configuration files: YAML mappings of key: value, with ``defaults:`` (base files) and ``per_task:``.

Everything a plain YAML reader would accept silently but the user did not mean is refused with one line naming
the file: bytes that are not UTF-8, an empty file, a key given twice in one mapping, a ``defaults:`` that is
not a file name. Whether a name is a configuration key is decided by the caller (``check_key``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import yaml

from experiment.errors import ConfigError

KeyCheck = Callable[[Any, str], None]  # (name, where it was found): raises ConfigError for an unknown key


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML file names the same key twice (plain YAML keeps the last one silently)."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(f"key {key!r} on lines {first_line} and {second_line}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (``<<`` merges may still be overridden)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise _DuplicateKeyError(key, lines[key], line)
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml_file(path: Path, named_by: str) -> dict[str, Any]:
    """The mapping held by one config file, or a ConfigError naming the file and the problem."""
    if path.is_dir():
        raise ConfigError(f"config file {path}{named_by} is a folder; name a .yaml file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{named_by}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path} ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as err:
        raise ConfigError(
            f"config file {path}: key '{err.key}' is given twice (lines {err.first_line} and {err.second_line}); "
            "keep one"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty; write key: value lines in it or leave it out of --config")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of key: value lines, not a {type(data).__name__} ({data!r:.60})"
        )
    return data


def _base_files(path: Path, base: Any) -> list[str]:
    """The file names of a ``defaults:`` entry: one name or a list of names."""
    names = [base] if isinstance(base, str) else base
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(
            f"config file {path}: 'defaults' must be a file name or a list of file names "
            f"(e.g. defaults: _base.yaml), got {base!r:.60}"
        )
    return names


def _read_per_task(path: Path, tasks: Any, check_key: KeyCheck) -> dict[int, dict]:
    """The ``per_task`` mapping of one file, checked: task numbers >= 1 mapped to known keys."""
    if not isinstance(tasks, dict):
        raise ConfigError(f"{path}: 'per_task' must map task numbers to mappings of key: value")
    for t, vals in tasks.items():
        if not isinstance(t, int) or isinstance(t, bool) or t < 1 or not isinstance(vals, dict):
            raise ConfigError(f"{path}: 'per_task' entries must be 'N: {{key: value}}' with N >= 1, got {t!r}")
        for name in vals:
            check_key(name, f"{path} per_task {t}")
    return tasks


def read_config_file(
    path: Path, check_key: KeyCheck, seen: tuple[Path, ...] = (), named_by: str = ""
) -> tuple[dict[str, Any], dict[int, dict]]:
    """Read one config file (following ``defaults:``); return (values, per_task), not yet coerced.

    ``check_key(name, where)`` raises for a name that is not a configuration key.
    """
    data = _load_yaml_file(path, named_by)
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'defaults'")
    values: dict[str, Any] = {}
    per_task: dict[int, dict] = {}
    base = data.pop("defaults", None)
    if base is not None:
        for item in _base_files(path, base):
            base_values, base_tasks = read_config_file(
                path.parent / item, check_key, (*seen, path.resolve()), f" (named by 'defaults' in {path})"
            )
            values.update(base_values)
            for t, v in base_tasks.items():
                per_task.setdefault(t, {}).update(v)
    for t, vals in _read_per_task(path, data.pop("per_task", None) or {}, check_key).items():
        per_task.setdefault(t, {}).update(vals)
    for name in data:
        check_key(name, str(path))
    values.update(data)
    return values, per_task
