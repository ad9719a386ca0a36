"""CCSI under each protocol (and switch) on digits, several seeds, with the data-access audit of every run.

Each variant is a method's digits config plus overrides, run with ``main.py`` in its own process (1 torch thread,
``--jobs`` at a time) into ``<runs>/<variant>/seed<k>``; a run whose metrics.json exists is reused. Writes
``<out>`` (markdown): mean +/- sample std over seeds of average incremental and last accuracy, and the summed
data-access counts of old-class real images (``tasks[i].data_access``) of each variant's first seed.

Example (the table in README's protocol section):
    .venv/bin/python bench/protocols.py --seeds 0 1 2 --jobs 2 --out bench/results/protocols_digits.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.data_access import PATHS  # noqa: E402

# name: (method, overrides); the digits configs are `make demo`'s settings.
CLEAN = "--protocol=clean"
VARIANTS = {
    "ccsi original": ("ccsi", ["--protocol=original"]),
    "ccsi clean": ("ccsi", [CLEAN]),
    "ccsi clean, per_class frozen": ("ccsi", [CLEAN, "--class_stats=per_class"]),
    "ccsi clean, per_class refresh": ("ccsi", [CLEAN, "--class_stats=per_class", "--class_stats_update=refresh"]),
    "ccsi clean, per_class refresh, unit clamp": (
        "ccsi",
        [CLEAN, "--class_stats=per_class", "--class_stats_update=refresh", "--syn_clamp=unit"],
    ),
    "ccsi improved": ("ccsi", ["--protocol=improved"]),
    "lwf clean": ("lwf", [CLEAN]),
    "deepinversion clean": ("deepinversion", [CLEAN]),
    "ewc clean": ("ewc", [CLEAN]),
    "finetune clean": ("finetune", [CLEAN]),
    "icarl clean": ("icarl", [CLEAN]),
}


def run_one(method: str, overrides: list[str], seed: int, folder: Path) -> dict:
    """metrics.json of one run (run now unless it exists)."""
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        args = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / f"configs/digits/{method}.yaml")]
        args += [f"--seed={seed}", f"--output_dir={folder}", "--progress=false", "--device=cpu", "--overwrite=true"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"seed{seed}.log", "w") as log:
            subprocess.run([*args, *overrides], env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return json.loads(metrics.read_text())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: accuracies over seeds and the first seed's audit counts (summed over tasks) per variant."""
    head = ["variant", "seeds", "avg inc acc", "last acc", *PATHS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        access = {p: sum(t["data_access"][p] for t in runs[0]["tasks"]) for p in PATHS}
        row = [name, ",".join(str(r["seed"]) for r in runs)]
        row += [
            mean_std([r["average_incremental_accuracy"] for r in runs]),
            mean_std([r["last_accuracy"] for r in runs]),
        ]
        lines.append("| " + " | ".join(row + [str(access[p]) for p in PATHS]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--audit-seeds", nargs="+", type=int, default=[0], help="seeds of the non-CCSI variants")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", default="runs/protocols")
    parser.add_argument("--out", default="bench/results/protocols_digits.md")
    parser.add_argument("--table-only", action="store_true", help="summarise the runs that exist, start none")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="--key=value overrides of every run (use another --runs)"
    )
    args = parser.parse_args()
    jobs = []
    for name in args.variants:
        method, overrides = VARIANTS[name]
        for seed in args.seeds if method == "ccsi" else args.audit_seeds:
            folder = ROOT / args.runs / name.replace(" ", "_").replace(",", "") / f"seed{seed}"
            if not (args.table_only and not (folder / "metrics.json").is_file()):
                jobs.append((name, method, [*overrides, *args.extra], seed, folder))
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: (j[0], run_one(*j[1:])), jobs))
    results: dict[str, list[dict]] = {}
    for name, metrics in done:
        results.setdefault(name, []).append(metrics)
    text = table(results)
    Path(args.out).write_text(
        "# Protocols on digits (`make demo` CCSI settings, 1 torch thread per run)\n\n"
        f"`python bench/protocols.py {' '.join(sys.argv[1:])}`. Accuracies: mean ± sample std over seeds. "
        "Data access: real images of old classes that reached the method, summed over tasks (first seed), "
        "by path (data_access.py).\n\n" + text + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
