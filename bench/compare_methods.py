"""Data-free comparison table (issue 25): every data-free method beside CCSI and memory-based references, on digits
and on the development set, seeds x entries, each run from configs/digits/<method>.yaml.

Entries: finetune, joint, lwf, deepinversion, abd, rdfcil, pass, ccsi under `clean` and under `improved`, and for
reference icarl, lucir and rehearsal_kd with one memory of ``--memory`` real images. Data sets: ``digits``
(scikit-learn's, embedded) and ``mnist-10k`` (``--dataset=npz --data_path=<--dev_data>``: the development set, 10,000
real MNIST digits, see its README). Runs go to <runs>/<set>/<entry>/seed<k>; a finished run (metrics.json) is
read back, not retrained. Writes <out>/comparison.md (mean ± sample std of last and average incremental accuracy,
minutes per run, the data-access total of every run), comparison.csv, runs.csv (one row per run, with its
per-path data-access counts) and curves_<set>.png/.pdf (accuracy after each task, ± 1 std band).
Extra --key=value arguments override every run.

Examples:
    .venv/bin/python bench/compare_methods.py                     # the full table: 2 sets x 12 entries x 3 seeds
    .venv/bin/python bench/compare_methods.py --sets digits --entries abd lwf --seeds 0
    .venv/bin/python bench/compare_methods.py --quick --entries finetune abd pass   # smoke: seconds per run
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval as engine
from bench.accuracy import mean_std, pm
from bench.synthesis_speed import describe_machine
from experiment import config
from experiment.checkpoint import completed_tasks, partial_tasks
from reporting.plots import plot_method_curves
from runtime.data_access import PATHS

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.compare_methods")

# entry -> (method, overrides of configs/digits/<method>.yaml); the memory size of rehearsal entries is --memory
ENTRIES: dict[str, tuple[str, dict[str, str]]] = {
    "finetune": ("finetune", {}),
    "joint": ("joint", {}),
    "lwf": ("lwf", {}),
    "deepinversion": ("deepinversion", {}),
    "abd": ("abd", {}),
    "rdfcil": ("rdfcil", {}),
    "pass": ("pass", {}),
    "ccsi-clean": ("ccsi", {"protocol": "clean"}),
    "ccsi-improved": ("ccsi", {"protocol": "improved"}),
    "icarl": ("icarl", {}),
    "lucir": ("lucir", {}),
    "rehearsal_kd": ("rehearsal_kd", {}),
}
REHEARSAL = {"icarl", "lucir", "rehearsal_kd"}
DEV_DATA = ROOT.parent / "shared" / "data" / "mnist-10k.npz"
# --quick: a smoke run of the command (2 tasks, 1 epoch, a few synthesis and generator steps), not a result
QUICK = {
    "epochs": "1",
    "nb_cl_fg": "8",
    "nb_cl": "2",
    "nb_generation": "1",
    "syn_batch_size": "8",
    "syn_iterations": "2",
    "syn_warmup": "1",
    "gen_iterations": "2",
    "gen_batch_size": "8",
    "gen_width": "8",
    "gen_z_dim": "16",
    "rdfcil_ft_epochs": "1",
}


def set_overrides(name: str, dev_data: Path) -> dict[str, str]:
    """The data set keys of a set of the table."""
    if name == "digits":
        return {}
    if name == "mnist-10k":
        return {"dataset": "npz", "data_path": str(dev_data)}
    raise ValueError(f"unknown set {name!r}; one of digits, mnist-10k")


def run_entry(
    data_set: str, entry: str, seed: int, runs: Path, overrides: dict[str, str], memory: int, collect: bool = False
) -> dict[str, Any]:
    """Run one entry and seed (or read back a finished run); a record with accuracies, minutes and data access.
    With ``collect`` nothing runs: a run not finished yet is recorded as ``missing``."""
    method, own = ENTRIES[entry]
    folder = runs / data_set / entry / f"seed{seed}"
    rec: dict[str, Any] = {"set": data_set, "entry": entry, "seed": seed, "output_dir": str(folder)}
    if collect and not (folder / "metrics.json").is_file():
        return {**rec, "status": "missing"}
    try:
        values = {"progress": "false", **own, **overrides, "seed": seed, "output_dir": str(folder)}
        if method in REHEARSAL:
            values["memory_size"] = str(memory)
        if completed_tasks(folder) or partial_tasks(folder):
            values["resume"] = "true"  # continue the part already done
        if not (folder / "metrics.json").is_file():
            cfg = config.load_config([ROOT / "configs" / "digits" / f"{method}.yaml"], values)
            log.info("run %s/%s seed %d -> %s", data_set, entry, seed, folder)
            engine.run(cfg)
            rec["status"] = "done"
        else:
            rec["status"] = "skipped"
        doc = json.loads((folder / "metrics.json").read_text())
        rec.update(last=doc["last_accuracy"], average=doc["average_incremental_accuracy"])
        rec["curve"] = doc["accuracy_per_task"]
        stages = ("seconds_before_task", "seconds_training", "seconds_after_task")
        rec["minutes"] = sum(t.get(k, 0.0) for t in doc["tasks"] for k in stages) / 60
        for path in (*PATHS, "total"):
            rec[f"access_{path}"] = sum(t["data_access"][path] for t in doc["tasks"])
    except Exception as err:  # record it, go on with the table
        log.exception("%s/%s seed %d failed", data_set, entry, seed)
        rec.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0])
    return rec


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set, entry) over its finished seeds."""
    rows = []
    for key in dict.fromkeys((r["set"], r["entry"]) for r in records):
        ok = [r for r in records if (r["set"], r["entry"]) == key and r["status"] in ("done", "skipped")]
        if ok:
            rows.append(
                {
                    "set": key[0],
                    "entry": key[1],
                    "seeds": [r["seed"] for r in ok],
                    "last": mean_std([r["last"] for r in ok]),
                    "average": mean_std([r["average"] for r in ok]),
                    "minutes": sum(r["minutes"] for r in ok) / len(ok),
                    "access": [r["access_total"] for r in ok],
                    "curves": [r["curve"] for r in ok],
                }
            )
    return rows


def write_outputs(out: Path, records: list[dict[str, Any]], rows: list[dict[str, Any]], header: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = ["set", "entry", "seed", "status", "last", "average", "minutes", *(f"access_{p}" for p in (*PATHS, "total"))]
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, [*cols, "output_dir", "error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "entry", "seeds", "last_mean", "last_std", "average_mean", "average_std", "minutes"])
        for r in rows:
            stats = [f"{r[k][i]:.4f}" if r[k] else "" for k in ("last", "average") for i in (0, 1)]
            writer.writerow([r["set"], r["entry"], " ".join(map(str, r["seeds"])), *stats, f"{r['minutes']:.2f}"])
    lines = [*header, "", "| set | entry | seeds | last acc | avg inc acc | min/run | data access (per run) |"]
    lines.append("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        seeds, access = ",".join(map(str, r["seeds"])), ", ".join(map(str, r["access"]))
        last, average = (pm(r[k]) if len(r["seeds"]) > 1 else f"{r[k][0]:.2f}" for k in ("last", "average"))
        lines.append(f"| {r['set']} | {r['entry']} | {seeds} | {last} | {average} | {r['minutes']:.1f} | {access} |")
    for data_set in dict.fromkeys(r["set"] for r in rows):
        curves = {r["entry"]: r["curves"] for r in rows if r["set"] == data_set}
        png = plot_method_curves(out / f"curves_{data_set}.png", curves, f"{data_set}: accuracy after each task")[0]
        lines += ["", f"![{data_set}]({png.name}) ([PDF]({png.with_suffix('.pdf').name}))"]
    failed = [r for r in records if r["status"] == "failed"]
    lines += ["", f"## Failed runs ({len(failed)})", ""]
    lines += [f"- {r['set']}/{r['entry']} seed {r['seed']}: {r['error']}" for r in failed]
    missing = [r for r in records if r["status"] == "missing"]
    if missing:
        lines += ["", f"## Not run yet ({len(missing)}, --collect)", ""]
        lines += [", ".join(f"{r['set']}/{r['entry']} seed {r['seed']}" for r in missing)]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--entries", nargs="+", choices=sorted(ENTRIES), help="default: all twelve")
    parser.add_argument("--sets", nargs="+", default=["digits", "mnist-10k"], choices=["digits", "mnist-10k"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--memory", type=int, default=200, help="real images kept by icarl, lucir, rehearsal_kd")
    parser.add_argument("--dev_data", type=Path, default=DEV_DATA, help="the development set's .npz")
    parser.add_argument("--out", type=Path, default=Path("bench/results/comparison"))
    parser.add_argument("--runs", type=Path, default=Path("runs/comparison"))
    parser.add_argument("--quick", action="store_true", help="smoke run of the command: " + str(QUICK))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--collect", action="store_true", help="run nothing: tabulate the finished runs only")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = {**(QUICK if args.quick else {}), **config.parse_overrides(extra)}
    except config.ConfigError as err:
        parser.error(str(err))
    if {"output_dir", "seed", "method", "dataset", "data_path"} & set(overrides):
        parser.error("--output_dir, --seed, --method, --dataset and --data_path are set per run here")
    if "mnist-10k" in args.sets and not args.dev_data.is_file():
        parser.error(f"the development set {args.dev_data} is missing; pass --dev_data or --sets digits")
    entries = args.entries or list(ENTRIES)
    start, records = time.perf_counter(), []
    for data_set in args.sets:
        set_keys = {**overrides, **set_overrides(data_set, args.dev_data)}
        for entry in entries:
            records += [
                run_entry(data_set, entry, s, args.runs, set_keys, args.memory, args.collect) for s in args.seeds
            ]
    header = [
        f"# Data-free comparison ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- command: `python bench/compare_methods.py {shlex.join(argv)}`",
        f"- machine: {describe_machine()}",
        "- configs: `configs/digits/<method>.yaml` on every set; ccsi under `clean` and `improved`, every other "
        f"entry under its config's protocol; icarl, lucir, rehearsal_kd keep {args.memory} real images",
        "- overrides for every run: " + (" ".join(f"`--{k}={v}`" for k, v in overrides.items()) or "none"),
        *(["- --quick: a smoke run of the command, not a result"] * args.quick),
        f"- wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min",
        "- last / avg inc acc: test accuracy (%) on all seen classes, mean ± sample std over seeds; min/run: training "
        "+ synthesis minutes; data access: real images of old classes that reached the method, all paths and tasks",
    ]
    write_outputs(args.out, records, summarise(records), header)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"{len(records)} runs, {len(failed)} failed; table in {args.out / 'comparison.md'}")
    for r in failed:
        print(f"FAILED {r['set']}/{r['entry']} seed {r['seed']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
