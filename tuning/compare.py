"""usage: python main.py compare FOLDER... [--by KEY[,KEY]] [--out DIR]

Finds the runs below each FOLDER (the folders that hold a metrics.json; moved-aside replaced-* copies are left
out) and prints one table: the result-changing keys whose values differ between the runs (read from each run's
config.yaml; data set, method and protocol when none differ), then average incremental accuracy, last accuracy,
forgetting and last val accuracy, as mean ± sample std over the runs that differ only in their seed (n: how
many). --by groups by the named keys only (mean over all the other differences). Writes compare.csv, compare.md
and compare.png/.pdf (accuracy after each task of each group, ±1 std band) into --out (default: the first
FOLDER). Rows are ranked by the last val accuracy (what best: chains from; never the test split), then by average
incremental accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiment.config import OPTIONS, ConfigError
from experiment.identity import identity_values
from reporting.plots import plot_method_curves

log = logging.getLogger(__name__)

USAGE = "usage: python main.py compare FOLDER... [--by KEY[,KEY]] [--out DIR]"
# metrics.json key -> column name
METRICS = {
    "average_incremental_accuracy": "avg_inc_acc",
    "last_accuracy": "last_acc",
    "forgetting": "forgetting",
    "last_val_accuracy": "val_acc",
}
MAX_CURVES = 16  # groups drawn in the figure (plot_method_curves' distinct styles); the table has them all


@dataclass
class Run:
    """One finished run: its folder, its result-changing key values and its metrics.json."""

    folder: Path
    values: dict[str, Any]  # identity.identity_values of its config, plus the task it trained ("task")
    metrics: dict[str, Any]


@dataclass
class Group:
    """Runs that agree on the compared keys: their shown key values and the runs."""

    keys: dict[str, Any]
    runs: list[Run]

    def stats(self, metric: str) -> tuple[float | None, float | None]:
        """(mean, sample std) of ``metric`` over the runs that have it; std None for fewer than two."""
        values = [float(r.metrics[metric]) for r in self.runs if r.metrics.get(metric) is not None]
        if not values:
            return None, None
        mean = sum(values) / len(values)
        if len(values) < 2:
            return mean, None
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def config_file(folder: Path) -> Path | None:
    """The run's config.yaml, or for a run of one task the config_task_<t>.yaml of its latest task."""
    if (folder / "config.yaml").is_file():
        return folder / "config.yaml"
    per_task = sorted(folder.glob("config_task_*.yaml"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    return per_task[-1] if per_task else None


def read_run(folder: Path) -> Run | None:
    """The run in ``folder``; None (with a line) when its metrics.json or config cannot be read."""
    path = config_file(folder)
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        cfg = yaml.safe_load(path.read_text()) if path is not None else None
    except (OSError, ValueError, yaml.YAMLError) as err:
        log.warning("compare: skipping %s (%s)", folder, err)
        return None
    if not isinstance(cfg, dict):
        log.warning("compare: skipping %s (no config.yaml)", folder)
        return None
    values = identity_values(cfg)
    values["task"] = cfg.get("task")  # a per-task run trains one task (a run-scope key, but results differ)
    return Run(folder, values, metrics)


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Every run below ``folders`` (a folder holding metrics.json), leaving out replaced-* folders; sorted."""
    found: dict[Path, None] = {}
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"compare: {root} is not a folder; {USAGE}")
        for path in sorted(root.rglob("metrics.json")):
            if not any(part.startswith("replaced-") for part in path.relative_to(root).parts):
                found[path.parent.resolve()] = None
    runs = [run for run in map(read_run, found) if run is not None]
    if not runs:
        raise ConfigError(f"compare: no finished run (a folder with metrics.json) below {', '.join(map(str, folders))}")
    return runs


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The keys (seed left out) whose values are not the same in every run, in name order."""
    names = sorted({name for run in runs for name in run.values} - {"seed"})
    return [n for n in names if len({_text(run.values.get(n)) for run in runs}) > 1]


def group_runs(runs: Sequence[Run], by: Sequence[str] = ()) -> tuple[list[str], list[Group]]:
    """(the shown keys, the groups): runs equal in every key but the seed, or equal in the ``by`` keys."""
    shown = list(by) or differing_keys(runs) or ["dataset", "method", "protocol"]  # none differ: name the runs
    groups: dict[str, Group] = {}
    for run in runs:
        same = by or [n for n in run.values if n != "seed"]
        ident = json.dumps({n: run.values.get(n) for n in same}, sort_keys=True, default=str)
        group = groups.setdefault(ident, Group({n: run.values.get(n) for n in shown}, []))
        group.runs.append(run)
    return shown, sorted(groups.values(), key=_rank)


def _rank(group: Group) -> tuple[float, float]:
    """Best last val accuracy first (the sweeps' metric: ranking by a test accuracy would invite choosing on it),
    then best average incremental accuracy; groups without one last."""
    val, average = group.stats("last_val_accuracy")[0], group.stats("average_incremental_accuracy")[0]
    return (math.inf if val is None else -val, math.inf if average is None else -average)


def _text(value: Any) -> str:
    """A key's value in a table: lists and per-task tables as compact JSON, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _stat_text(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def table_rows(shown: list[str], groups: list[Group]) -> list[list[str]]:
    """Header and one row per group: the shown keys, n, then each metric as mean ± std."""
    rows = [[*shown, "n", *METRICS.values()]]
    for g in groups:
        rows.append([*(_text(g.keys[k]) for k in shown), str(len(g.runs)), *(_stat_text(*g.stats(m)) for m in METRICS)])
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Plain text: keys left-aligned, numbers right-aligned."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    n_keys = len(rows[0]) - len(METRICS) - 1

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < n_keys else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows[1:])])


def markdown_table(rows: list[list[str]]) -> str:
    n_keys = len(rows[0]) - len(METRICS) - 1
    align = ["---"] * n_keys + ["---:"] * (len(rows[0]) - n_keys)
    lines = [rows[0], align, *rows[1:]]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines) + "\n"


def csv_text(shown: list[str], groups: list[Group]) -> str:
    """One row per group: keys, n, seeds, <metric>_mean and <metric>_std (full precision), the run folders."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*shown, "n", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "runs"])
    for g in groups:
        stats = [("" if v is None else f"{v:.4f}") for m in METRICS for v in g.stats(m)]
        seeds = ";".join(str(r.values.get("seed")) for r in g.runs)
        runs = ";".join(str(r.folder) for r in g.runs)
        writer.writerow([*(_text(g.keys[k]) for k in shown), len(g.runs), seeds, *stats, runs])
    return text.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and os.replace: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"compare: cannot write {path} ({err.strerror}); choose another folder with --out DIR"
        ) from None


def label(group: Group, shown: list[str]) -> str:
    """The group's name in the figure: its shown keys."""
    return ", ".join(f"{k}={_text(group.keys[k])}" for k in shown)


def write_figure(out: Path, shown: list[str], groups: list[Group]) -> list[Path]:
    """compare.png/.pdf: accuracy after each task, the mean of each group with a ±1 std band (16 groups at most)."""
    curves = {label(g, shown): [r.metrics.get("accuracy_per_task") or [] for r in g.runs] for g in groups[:MAX_CURVES]}
    runs = [r for g in groups for r in g.runs]
    what = " · ".join(", ".join(sorted({str(r.values.get(k)) for r in runs})) for k in ("dataset", "method"))
    title = f"{what}: {len(groups)} group(s)" + (f", the best {MAX_CURVES} drawn" if len(groups) > MAX_CURVES else "")
    return plot_method_curves(out / "compare.png", curves, title)


def compare(
    folders: Sequence[str | Path], by: Sequence[str] = (), out: str | Path | None = None, write: bool = True
) -> str:
    """Find, group and tabulate the runs below ``folders``; unless ``write`` is false, write compare.csv/.md/.png/.pdf
    into ``out`` (default: the first folder); return the table as text (with a line naming the files)."""
    unknown = [k for k in by if k not in OPTIONS and k != "task"]
    if unknown:
        raise ConfigError(f"compare --by: unknown key {unknown[0]!r}; {USAGE}")
    if "seed" not in OPTIONS:  # which keys change results is known only once every key is declared
        raise ConfigError("the configuration keys are not declared in this process (the engine was not imported)")
    runs = find_runs(folders)
    shown, groups = group_runs(runs, by)
    rows = table_rows(shown, groups)
    text = f"{len(runs)} run(s) in {len(groups)} group(s) (mean ± std over seeds)\n{format_table(rows)}"
    if not write:
        return text
    target = Path(out if out is not None else folders[0]).expanduser()
    write_text(target / "compare.csv", csv_text(shown, groups))
    write_text(target / "compare.md", markdown_table(rows))
    write_figure(target, shown, groups)
    return f"{text}\n(written to {target}/compare.csv, compare.md, compare.png)"


def sweep_folders(commands: Sequence[Sequence[str]]) -> list[str]:
    """The folders a sweep's points write below: the fixed part of each point's ``--output_dir=`` (up to its first
    ``{placeholder}``), each once."""
    folders = []
    for command in commands:
        given = [a.split("=", 1)[1] for a in command if a.startswith("--output_dir=")]
        if given:
            template = os.path.expandvars(os.path.expanduser(given[-1]))
            fixed = template.split("{", 1)[0]
            folders.append(fixed if "{" not in template or fixed.endswith("/") else os.path.dirname(fixed) or ".")
    return list(dict.fromkeys(folders))


def sweep_table(commands: Sequence[Sequence[str]]) -> str:
    """The compare table over the runs of a sweep's points (printed only: the sweep folder holds the points' run
    folders alone); one line instead when the points name no output_dir or none finished."""
    folders = sweep_folders(commands)
    if not folders:
        return "sweep: the points name no --output_dir; compare their runs with: python main.py compare FOLDER"
    try:
        table = compare(folders, write=False)
        return f"{table}\n(as CSV, Markdown and a figure: python main.py compare {' '.join(folders)} --out DIR)"
    except ConfigError as err:
        return f"sweep: no table ({err}); compare the points with: python main.py compare {' '.join(folders)}"


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """FOLDER..., --by KEY[,KEY] (repeatable), --out DIR; both as --name=value or --name value."""
    folders, by, out = [], [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if name in ("--by", "--out"):
            if not value:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"{name} needs a value; {USAGE}")
                value, i = argv[i + 1], i + 1
            if name == "--by":
                by += [k.strip() for k in value.split(",") if k.strip()]
            else:
                out = value
        elif arg.startswith("-"):
            raise ConfigError(f"compare: unknown option {name!r}; {USAGE}")
        else:
            folders.append(arg)
        i += 1
    if not folders:
        raise ConfigError(USAGE)
    return folders, by, out


def main(argv: Sequence[str]) -> str:
    """``main.py compare``: the table over the runs below the folders (files written beside it)."""
    folders, by, out = parse_args(list(argv))
    return compare(folders, by, out)
