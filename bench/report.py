"""Printing and saving a benchmark's markdown report."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path) -> None:
    """Print the report and write it to ``out`` (creating its folder)."""
    text = "\n".join(lines)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten: {out}")
