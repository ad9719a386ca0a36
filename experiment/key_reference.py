"""The key reference: ``python main.py keys`` (plain text within 100 columns, filtered by method, group or protocol)
and ``keys --markdown`` (docs/config.md), both from the declared keys and presets of ``experiment.config``."""

from __future__ import annotations

import textwrap

from experiment import protocols
from experiment.config import OPTIONS, PRESETS, ConfigError, Option, coerce, preset_settings, unused_keys


def reference_table() -> str:
    """Markdown table of every key, grouped, for the README/docs."""
    lines = [
        "Scope: `run` keys say how to run (never part of a run's identity); `experiment` keys hold for a whole run "
        "(resuming or continuing a run needs the same value); `task` keys may differ per task (`per_task:`, the "
        "per-task sweeps). `experiment` and `task` keys make the run's `config_hash`.",
        "",
        "| key | type | default | allowed | scope | meaning |",
        "|---|---|---|---|---|---|",
    ]
    preset_notes = [
        f"- `{key}: {value}` sets "
        + ", ".join(f"`{n}: {s.value}`" + (" (required)" if s.required else "") for n, s in settings.items())
        for key, table in PRESETS.items()
        for value, settings in ((v, preset_settings(key, v)) for v in table)
        if settings
    ]
    for group in sorted({o.group for o in OPTIONS.values()}, key=lambda g: (g != "run", g)):
        lines.append(f"| **{group}** | | | | | |")
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
            lines.append(f"| `{opt.name}` | {opt.kind} | `{default}` | {allowed} | {opt.scope} | {opt.help} |")
    if preset_notes:
        lines += ["", "Presets (a key set explicitly, in a file or on the command line, wins over its preset):", ""]
        lines += preset_notes
    lines += ["", "## Protocols (configs/protocols.yaml)", "", protocols.table_markdown(protocols.load_table())]
    return "\n".join(lines)


def _allowed(opt: Option) -> str:
    """'a | b' for choices, '[min, max]' for bounds, ', null' when nullable (as in docs/config.md)."""
    allowed = ""
    if opt.choices:
        allowed = " | ".join(map(str, opt.choices))
    elif opt.min is not None or opt.max is not None:
        low = "(" if opt.min_exclusive else "["
        allowed = f"{low}{'' if opt.min is None else opt.min}, {'' if opt.max is None else opt.max}]"
    return (allowed + ", null").lstrip(", ") if opt.nullable else allowed


def keys_text(
    method: str | None = None, group: str | None = None, protocol: str | None = None, width: int = 100
) -> str:
    """The keys as plain text that fits ``width`` columns, grouped: type, default, what the chosen protocol (the
    default one unless given) and method set, allowed values, scope, meaning. ``method``: only the keys that
    method reads; ``group``: only that group."""

    protocol = protocol or OPTIONS["protocol"].default
    for key, value in (("protocol", protocol), ("method", method)):
        if value is not None:
            coerce(OPTIONS[key], value)  # a bad name is refused with the allowed ones
    groups = sorted({o.group for o in OPTIONS.values()}, key=lambda g: (g != "run", g))
    if group is not None and group not in groups:
        raise ConfigError(f"--group {group!r} is not a group of keys; one of {', '.join(groups)}")
    presets = [preset_settings("protocol", protocol)] + ([preset_settings("method", method)] if method else [])
    title = (
        f"Configuration keys (protocol {protocol}{f', method {method}' if method else ''}): name (type, scope) = "
        "default -> the value a preset sets unless the key is set (by which preset), allowed values; meaning."
    )
    lines = textwrap.wrap(title, width)
    for name in [g for g in groups if group in (None, g)]:
        opts = sorted((o for o in OPTIONS.values() if o.group == name), key=lambda o: o.name)
        if method is not None:
            opts = [o for o in opts if not unused_keys(method, [o.name])]
        if not opts:
            continue
        lines += ["", f"[{name}]"]
        for opt in opts:
            default = "null" if opt.default is None else opt.default
            head = f"{opt.name} ({opt.kind}, {opt.scope}) = {default}"
            for table in presets:
                if opt.name in table:
                    head += f" -> {table[opt.name].value} ({table[opt.name].owner})"
            allowed = _allowed(opt)
            head += f"  allowed: {allowed}" if allowed else ""
            lines += textwrap.wrap(head, width, initial_indent="  ", subsequent_indent="      ")
            lines += textwrap.wrap(opt.help, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
