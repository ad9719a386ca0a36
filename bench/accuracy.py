"""Accuracy benchmark: methods x data sets x seeds, each run from configs/<dataset>/<method>.yaml, in one command.

Every run goes through incremental_train_and_eval.run in this process, in its own folder
<runs>/<dataset>/<method>/seed<k>: a run whose metrics.json exists is skipped, a partly finished one resumes
(resume=true), a failing one is recorded and the grid goes on. Writes <out>/results.md (mean +/- std over seeds of
average incremental accuracy, last accuracy and forgetting; protocol, machine, command), <out>/results.csv (one row
per data set x method), <out>/runs.csv (one row per run) and <out>/curves_<dataset>.png and .pdf (mean over seeds
and a band of ± std). Extra --key=value arguments override every run's configuration.

Examples:
    .venv/bin/python bench/accuracy.py --quick                   # digits, every method, seeds 0-2, 2-core CPU
    .venv/bin/python bench/accuracy.py --device=cuda             # the four MedMNIST sets, paper settings
    .venv/bin/python bench/accuracy.py --datasets bloodmnist --methods ccsi lwf --seeds 0 --epochs=50
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval as engine
from bench.synthesis_speed import describe_machine
from experiment import config, identity
from experiment.checkpoint import completed_tasks, partial_tasks
from experiment.errors import UserError
from reporting.metrics import format_results_table
from reporting.plots import plot_method_curves

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.accuracy")
FULL_DATASETS = ("bloodmnist", "pathmnist", "organamnist", "tissuemnist")
# --quick: digits on a 2-core CPU, 12 methods x 3 seeds in under 30 min (sizing: bench/README.md)
QUICK_OVERRIDES = {"epochs": "4", "syn_iterations": "30", "syn_warmup": "3"}
METRICS = (("average_incremental_accuracy", "avg inc acc"), ("last_accuracy", "last acc"), ("forgetting", "forgetting"))


def methods_with_config(dataset: str) -> list[str]:
    """Methods that have configs/<dataset>/<method>.yaml (bases and sweep files excluded)."""
    files = (ROOT / "configs" / dataset).glob("*.yaml")
    return sorted(p.stem for p in files if not p.stem.startswith(("_", "sweep")))


def same_run(cfg: config.Config, folder: Path) -> bool:
    """Whether folder/config.yaml holds this configuration (keys that change results: experiment and task scopes)."""
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    return not identity.differences(saved, cfg.to_dict(), identity.RESUME_SCOPES)


def run_one(dataset: str, method: str, seed: int, runs: Path, overrides: dict[str, str]) -> dict[str, Any]:
    """Run (or skip, or resume) one run; returns a record with status done/skipped/failed."""
    folder = runs / dataset / method / f"seed{seed}"
    rec: dict[str, Any] = {"dataset": dataset, "method": method, "seed": seed, "output_dir": str(folder)}
    try:
        values = {"progress": "false", **overrides, "seed": seed, "output_dir": str(folder)}
        if completed_tasks(folder) or partial_tasks(folder):
            values["resume"] = "true"  # continue the part already done
        cfg = engine.load_run_config([ROOT / "configs" / dataset / f"{method}.yaml"], values)
        rec["protocol"] = cfg.protocol
        started = (folder / "metrics.json").is_file() or "resume" in values
        if started and (folder / "config.yaml").is_file() and not same_run(cfg, folder):
            raise UserError(f"{folder} holds a run with another configuration; delete it or pass --runs DIR")
        if (folder / "metrics.json").is_file():
            rec["status"] = "skipped"
            log.info("skip %s/%s seed %d: %s/metrics.json exists", dataset, method, seed, folder)
        else:
            log.info("run %s/%s seed %d -> %s", dataset, method, seed, folder)
            engine.run(cfg)
            rec["status"] = "done"
        doc = json.loads((folder / "metrics.json").read_text())
        rec.update({k: doc[k] for k, _ in METRICS}, accuracy_per_task=doc["accuracy_per_task"])
        stages = ("seconds_before_task", "seconds_training", "seconds_after_task")
        rec["seconds"] = sum(t.get(k, 0.0) for t in doc["tasks"] for k in stages)
    except Exception as err:  # record it, go on with the grid
        (log.error if isinstance(err, UserError) else log.exception)(
            "%s/%s seed %d failed: %s", dataset, method, seed, err
        )
        rec.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return rec


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value), None values dropped."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return None if v.size == 0 else (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method) over its finished seeds."""
    rows = []
    for key in dict.fromkeys((r["dataset"], r["method"]) for r in records):
        ok = [r for r in records if (r["dataset"], r["method"]) == key and r["status"] != "failed"]
        if not ok:
            continue
        row: dict[str, Any] = {"dataset": key[0], "method": key[1], "protocol": ok[0]["protocol"]}
        row["seeds"] = [r["seed"] for r in ok]
        for name, _ in METRICS:
            row[name] = mean_std([r[name] for r in ok])
        curves = [r["accuracy_per_task"] for r in ok if len(r["accuracy_per_task"]) == len(ok[0]["accuracy_per_task"])]
        row["accuracy_per_task"] = np.mean(curves, axis=0).tolist()
        row["accuracy_curves"] = curves  # per seed: the band of the curves plot
        row["minutes_per_run"] = float(np.mean([r["seconds"] for r in ok])) / 60
        rows.append(row)
    return rows


def pm(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def write_outputs(out: Path, records: list, rows: list, header: list[str]) -> None:
    """results.md, results.csv, runs.csv and one curves figure (PNG and PDF) per data set."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as f:
        cols = ["dataset", "method", "seed", "status", *(k for k, _ in METRICS), "seconds", "output_dir", "error"]
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "method", "protocol", "seeds", *(f"{k}_{s}" for k, _ in METRICS for s in
                         ("mean", "std")), "minutes_per_run", "accuracy_per_task_mean"])  # fmt: skip
        for r in rows:
            stats = [("" if r[k] is None else f"{r[k][i]:.4f}") for k, _ in METRICS for i in (0, 1)]
            curve = ";".join(f"{v:.4f}" for v in r["accuracy_per_task"])
            seeds = " ".join(map(str, r["seeds"]))
            writer.writerow(
                [r["dataset"], r["method"], r["protocol"], seeds, *stats, f"{r['minutes_per_run']:.2f}", curve]
            )
    lines = [
        *header,
        "",
        "| dataset | method | protocol | seeds | " + " | ".join(n for _, n in METRICS) + " | min/run |",
    ]
    lines.append("|---|---|---|---|" + "---:|" * (len(METRICS) + 1))
    for r in rows:
        cells = [r["dataset"], r["method"], r["protocol"], ",".join(map(str, r["seeds"]))]
        cells += [pm(r[k]) for k, _ in METRICS] + [f"{r['minutes_per_run']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        curves = {r["method"]: r["accuracy_curves"] for r in rows if r["dataset"] == dataset}
        protocols = ", ".join(dict.fromkeys(r["protocol"] for r in rows if r["dataset"] == dataset))
        title = f"{dataset}: accuracy after each task (protocol {protocols})"
        png, _ = plot_method_curves(out / f"curves_{dataset}.png", curves, title)
        lines += ["", f"![{dataset}]({png.name}) ([PDF]({png.with_suffix('.pdf').name}))"]
    failed = [r for r in records if r["status"] == "failed"]
    lines += ["", f"## Failed runs ({len(failed)})", ""] + [
        f"- {r['dataset']}/{r['method']} seed {r['seed']}: {r['error']}" for r in failed
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    epilog = "--key=value: configuration overrides for every run (python main.py keys lists the keys)"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, epilog=epilog)
    parser.add_argument("--methods", nargs="+", help="default: every method with a config for the data set")
    parser.add_argument("--datasets", nargs="+", help=f"default: {' '.join(FULL_DATASETS)} (--quick: digits)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="bench/results", help="folder of results.md/csv and the curves")
    parser.add_argument("--runs", default="runs/bench", help="root of the run folders <dataset>/<method>/seed<k>")
    parser.add_argument("--quick", action="store_true", help="digits, sized for a 2-core CPU: " + str(QUICK_OVERRIDES))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; --quick: 1)"
    )
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.quick and args.threads is None:
        args.threads = 1  # a 2-core CPU shared with other work: 2 OpenMP threads stall each other (bench/README.md)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = args.datasets or (["digits"] if args.quick else list(FULL_DATASETS))
    unknown = [d for d in datasets if not methods_with_config(d)]
    if unknown:
        parser.error(f"no configs/<dataset>/<method>.yaml for data set(s) {unknown}")
    try:
        overrides = {**(QUICK_OVERRIDES if args.quick else {}), **engine.parse_run_overrides(extra)}
    except config.ConfigError as err:
        parser.error(str(err))
    if {"task", "saved_model_address", "output_dir", "seed"} & set(overrides):
        parser.error("--task, --saved_model_address, --output_dir and --seed are set per run here (use --seeds)")
    unknown = [m for m in args.methods or [] if not any(m in methods_with_config(d) for d in datasets)]
    if unknown:
        parser.error(f"no config for method(s) {unknown} in configs/{{{','.join(datasets)}}}/")
    grid = [(d, m) for d in datasets for m in (args.methods or methods_with_config(d))]
    missing = [f"{d}/{m}" for d, m in grid if m not in methods_with_config(d)]
    start, records = time.perf_counter(), []
    for dataset, method in grid:
        if method in methods_with_config(dataset):
            records += [run_one(dataset, method, seed, Path(args.runs), overrides) for seed in args.seeds]
    rows = aggregate(records)
    header = [
        f"# Accuracy benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- command: `python bench/accuracy.py {shlex.join(argv)}`",
        f"- machine: {describe_machine()}",
        f"- runs: `{args.runs}/<dataset>/<method>/seed<k>` from `configs/<dataset>/<method>.yaml`; "
        "protocol per row (`clean`, `improved`: no old-class real image after its task, no test image before each "
        "task's final evaluation)",
        "- overrides for every run: " + (" ".join(f"`--{k}={v}`" for k, v in overrides.items()) or "none"),
        *(["- --quick: fewer epochs and synthesis iterations than the configs (sizing: bench/README.md)"] * args.quick),
        f"- wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min",
        "- metrics: test accuracy (%) on all seen classes; mean ± sample std over seeds; forgetting: mean over old "
        "tasks of best past minus final accuracy; min/run: minutes of training + synthesis per run",
        *([f"- no config, not run: {', '.join(missing)}"] if missing else []),
    ]
    write_outputs(Path(args.out), records, rows, header)
    table = [{**r, **{k: pm(r[k]) for k, _ in METRICS}} for r in rows]
    print("\n" + format_results_table(table))
    failed = [r for r in records if r["status"] == "failed"]
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    print(f"\n{len(records)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; results in {args.out}/")
    if missing:
        print(f"no config, not run: {', '.join(missing)}")
    for r in failed:
        print(f"FAILED {r['dataset']}/{r['method']} seed {r['seed']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
