"""The protocols (``configs/protocols.yaml``): what each value of the ``protocol`` key sets.

The table is read once; ``experiment.config`` declares the ``protocol`` key from it and registers each protocol as
a preset (a key set explicitly wins over its protocol); ``table_markdown`` is the section of docs/config.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TABLE_FILE = Path(__file__).resolve().parents[1] / "configs" / "protocols.yaml"
DEFAULT = "improved"


@dataclass(frozen=True)
class Protocol:
    """One row of the table: its own settings and the protocol it starts from (``base``)."""

    name: str
    help: str
    settings: dict[str, Any]
    base: str | None = None


def load_table(path: Path = TABLE_FILE) -> dict[str, Protocol]:
    """The protocols in file order; a malformed table is a programming error (ValueError naming the row)."""
    rows = yaml.safe_load(path.read_text())
    table = {}
    for name, row in rows.items():
        if set(row) - {"help", "settings", "base"} or not isinstance(row.get("settings"), dict):
            raise ValueError(f"{path}: protocol {name!r} needs 'help' and a 'settings' mapping (and may name a 'base')")
        if row.get("base") is not None and row["base"] not in table:
            raise ValueError(f"{path}: protocol {name!r} starts from {row['base']!r}, which is not above it")
        table[name] = Protocol(name, " ".join(str(row.get("help", "")).split()), dict(row["settings"]), row.get("base"))
    if DEFAULT not in table:
        raise ValueError(f"{path}: the default protocol {DEFAULT!r} is missing")
    return table


def resolved_settings(table: dict[str, Protocol], name: str) -> dict[str, Any]:
    """Every key protocol ``name`` sets: its own settings over those of its base."""
    row = table[name]
    inherited = resolved_settings(table, row.base) if row.base else {}
    return {**inherited, **row.settings}


def table_markdown(table: dict[str, Protocol]) -> str:
    """The protocols as a Markdown table: one column a protocol, one row a key it sets ("-": the protocol leaves
    the key at its default)."""
    names = list(table)
    keys = sorted({k for n in names for k in resolved_settings(table, n)})
    lines = ["| key | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        settings = [resolved_settings(table, n) for n in names]
        cells = [f"`{s[key]}`" if key in s else "-" for s in settings]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines += ["", *(f"- `{n}`: {table[n].help}" for n in names)]
    return "\n".join(lines)
