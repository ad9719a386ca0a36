"""CCSI ablation on the strictly data-free protocol: variants x seeds, last and average incremental accuracy, time.

Every variant is a config file plus key overrides (VARIANTS), run in worker processes (--jobs at a time, one torch
thread each) with PROTOCOL on top: protocol clean (the `improved` variant sets protocol improved), IdC sees only the
new classes' training images, the last epoch is kept and the lr is constant (no old-class image of any split drives
training or model selection). Key=value arguments apply to
every run, under the variant's own values. Writes <out>/ablation.md (mean ± sample std over seeds, the last accuracy
paired by seed against --reference, minutes per run, synthesis seconds) and <out>/runs.csv. Run folders are
<runs>/<variant>/seed<k>; a finished run with the same configuration is read back instead of rerun.

Examples:
    .venv/bin/python bench/ablation.py --variants mean_only ccsi it200 --jobs 2 --epochs=4
    .venv/bin/python bench/ablation.py --jobs 2 --out bench/results/ablation_digits --epochs=4
    .venv/bin/python bench/ablation.py --variants mean_only ccsi --custom "lr05:lr=0.05" --seeds 0
    .venv/bin/python bench/ablation.py --variants mean_only ccsi icarl --dataset=npz --data_path=/tmp/hard.npz
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import mean_std, pm, same_run
from bench.synthesis_speed import describe_machine
from experiment import config

ROOT = Path(__file__).resolve().parents[1]
CCSI = "configs/digits/ccsi.yaml"
# Strictly data-free; the base is protocol clean (moment targets: running statistics, as the released code), so the
# `improved` variant (the default protocol) is one row against it.
PROTOCOL = {"protocol": "clean", "idc_source": "train", "select_on": "last", "scheduler": "none"}
Variant = tuple[str, dict[str, str], str]  # config file, overrides, what it tests
SHIPPED = {"do_flip": "true", "class_stats": "per_class", "class_weights": "counts"}  # the config before issue 15
REFRESH = {"class_stats": "per_class", "class_stats_update": "refresh"}
# protocol improved as it was before issue 26 adopted the prototype head refit (the reference of the ablation's runs)
IMPROVED = {"protocol": "improved", "ccsi_head_refit_epochs": "0", "ccsi_prototypes": "false"}
IMPROVED["ccsi_prototype_drift"] = "false"
REFIT = {"ccsi_head_refit_epochs": "20"}
VARIANTS: dict[str, Variant] = {
    "mean_only": (CCSI, {"syn_iterations": "0"}, "no optimisation: class mean image + noise"),
    "ccsi": (CCSI, {}, "the config: 40 synthesis iterations, 160 impressions per task"),
    "it200": (CCSI, {"syn_iterations": "200", "syn_warmup": "20"}, "200 synthesis iterations"),
    "it1000": (CCSI, {"syn_iterations": "1000", "syn_warmup": "100"}, "1000 synthesis iterations"),
    "gen2": (CCSI, {"nb_generation": "2"}, "80 impressions per task"),
    "gen8": (CCSI, {"nb_generation": "8"}, "320 impressions per task"),
    "no_distill": (CCSI, {"lamda": "0"}, "without less-forget distillation"),
    "no_margin": (CCSI, {"lw_mr": "0"}, "without margin ranking"),
    "no_idc": (CCSI, {"da_coef": "0"}, "without intra-domain contrastive"),
    "no_class_weights": (CCSI, {"class_weights": "none"}, "plain CE instead of class-weighted CE"),
    "flip": (CCSI, {"do_flip": "true"}, "fix undone: random horizontal flips during synthesis"),
    "stored_stats": (CCSI, {"class_stats": "per_class"}, "fix undone: moments stored when each class was learned"),
    "counts": (CCSI, {"class_weights": "counts"}, "fix undone: CCSI's class weights n_max / n_c"),
    "shipped": (CCSI, SHIPPED, "all three fixes undone (the config before issue 15)"),
    "shipped_mean_only": (CCSI, {**SHIPPED, "syn_iterations": "0"}, "its mean-only variant"),
    "clamp_unit": (
        CCSI,
        {"syn_clamp": "unit"},
        "impressions clamped to [0, 1] (the released clamp: channel 0 to [-2.1, 2.2])",
    ),
    "tv01": (CCSI, {"tv_l2": "0.01"}, "10x the total-variation prior (0.01, the value of some CCSI configs)"),
    "improved": (CCSI, IMPROVED, "protocol improved before issue 26: per-class moments refreshed after each task"),
    "refresh_unit": (CCSI, {**REFRESH, "syn_clamp": "unit"}, "improved + impressions clamped to [0, 1]"),
    "icarl": ("configs/digits/icarl.yaml", {}, "iCaRL, 200 real exemplars (not data-free)"),
    # issue 26, on real images: the field's lessons as CCSI options, the settings chosen since fa7b86d one at a time
    # (each undone on top of improved), the leak clean had then, and the synthesis cost curve
    "improved_local_ce": (CCSI, {**IMPROVED, "ccsi_local_ce": "true"}, "improved + local CE and head CE (ABD)"),
    "improved_head_refit": (CCSI, {**IMPROVED, **REFIT}, "improved + class-balanced head refit, 20 epochs"),
    "improved_local_refit": (CCSI, {**IMPROVED, "ccsi_local_ce": "true", **REFIT}, "improved + both"),
    "improved_proto_refit": (
        CCSI,
        {**IMPROVED, **REFIT, "ccsi_prototypes": "true"},
        "improved + head refit with old classes drawn around their feature prototypes (PASS)",
    ),
    "improved_proto_drift": (
        CCSI,
        {**IMPROVED, **REFIT, "ccsi_prototypes": "true", "ccsi_prototype_drift": "true"},
        "improved_proto_refit with the prototypes moved by the drift of the task's features (SDC): protocol improved "
        "since issue 26",
    ),
    "improved_mean_only": (CCSI, {**IMPROVED, "syn_iterations": "0"}, "improved, no synthesis: mean image + noise"),
    "improved_idc_val": (CCSI, {**IMPROVED, "idc_source": "val"}, "LEAK (opt-in): IdC on all seen classes' val images"),
    "improved_frozen": (CCSI, {**IMPROVED, "class_stats_update": "frozen"}, "per-class moments not refreshed"),
    "improved_cn_momentum1": (CCSI, {**IMPROVED, "cn_momentum": "1.0"}, "CN momentum 1.0 (the released value)"),
    "improved_plateau": (CCSI, {**IMPROVED, "scheduler": "plateau"}, "plateau lr on the new classes' val accuracy"),
    "improved_flip": (CCSI, {**IMPROVED, "do_flip": "true"}, "random horizontal flips during synthesis"),
    "improved_counts": (CCSI, {**IMPROVED, "class_weights": "counts"}, "CCSI's class weights n_max / n_c"),
    "improved_it10": (CCSI, {**IMPROVED, "syn_iterations": "10", "syn_warmup": "2"}, "10 synthesis iterations"),
    "improved_it100": (CCSI, {**IMPROVED, "syn_iterations": "100", "syn_warmup": "10"}, "100 synthesis iterations"),
    "improved_it200": (CCSI, {**IMPROVED, "syn_iterations": "200", "syn_warmup": "20"}, "200 synthesis iterations"),
    "improved_gen16": (CCSI, {**IMPROVED, "nb_generation": "16"}, "640 impressions per task (4x)"),
}
METRICS = (("last_accuracy", "last acc"), ("average_incremental_accuracy", "avg inc acc"))
# At the end of the run: the old classes' accuracy (classes before the last task), the last task's, and the share of
# old-class test images predicted as one of the last task's classes (the recency bias behind a collapse).
END_METRICS = (("old_last", "old"), ("new_last", "new"), ("old_as_new", "old→new %"))


def end_of_run(doc: dict[str, Any]) -> dict[str, float]:
    """``END_METRICS`` from a metrics.json: its confusion matrix (rows: true class, in the scenario's order) split at
    the last task's first class."""
    confusion = doc["confusion_matrix"]  # (C, C)
    n_old = len(confusion) - doc["task_sizes"][-1]
    old_rows = confusion[:n_old]
    taken_as_new = sum(sum(row[n_old:]) for row in old_rows)
    return {
        "old_last": doc["old_accuracy_per_task"][-1],
        "new_last": doc["new_accuracy_per_task"][-1],
        "old_as_new": 100.0 * taken_as_new / max(1, sum(map(sum, old_rows))),
    }


def parse_custom(text: str) -> tuple[str, Variant]:
    """'name:key=value,key=value' (key 'config' picks the file) -> a variant."""
    name, _, body = text.partition(":")
    if not name or any("=" not in item for item in body.split(",") if item):
        raise ValueError(f"--custom {text!r}: expected 'name:key=value,key=value'")
    pairs = dict(item.split("=", 1) for item in body.split(",") if item)
    return name, (pairs.pop("config", CCSI), pairs, "custom: " + body)


def run_variant(
    name: str, config_file: str, values: dict[str, str], folder: Path, collect: bool = False
) -> dict[str, Any] | None:
    """One run in this (worker) process, or its earlier result when ``folder`` holds the same finished run;
    with ``collect`` only the earlier result (None when there is none)."""
    import torch

    import incremental_train_and_eval as engine

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = engine.load_run_config([ROOT / config_file], {**values, "output_dir": str(folder), "overwrite": "true"})
    done = folder / "ablation.json"
    if not (done.is_file() and (folder / "config.yaml").is_file() and same_run(cfg, folder)):
        if collect:
            return None
        start = time.perf_counter()
        engine.run(cfg)
        done.write_text(json.dumps({"wall_seconds": time.perf_counter() - start}))
    doc = json.loads((folder / "metrics.json").read_text())
    synthesis = sum(t.get("seconds_before_task", 0.0) for t in doc["tasks"])
    rec = {"variant": name, "seed": cfg.seed, **{k: doc[k] for k, _ in METRICS}, **end_of_run(doc)}
    rec["synthesis_seconds"] = synthesis
    return {**rec, **json.loads(done.read_text()), "output_dir": str(folder)}


def paired_difference(records: list[dict[str, Any]], name: str, reference: str) -> tuple[float, float] | None:
    """Mean ± sample std over seeds of last accuracy(name) - last accuracy(reference), paired by seed."""
    ref = {r["seed"]: r["last_accuracy"] for r in records if r["variant"] == reference}
    return mean_std([r["last_accuracy"] - ref[r["seed"]] for r in records if r["variant"] == name and r["seed"] in ref])


def table(records: list[dict[str, Any]], variants: dict[str, Variant], reference: str) -> list[str]:
    """Markdown rows: one per variant, in the order given."""
    lines = [
        f"| variant | what | config + overrides | seeds | last acc | avg inc acc | Δ last vs {reference} "
        "| last: old | last: new | old→new % | min/run | synth s/run |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (config_file, values, what) in variants.items():
        recs = [r for r in records if r["variant"] == name]
        if not recs:
            continue
        setting = Path(config_file).stem + "".join(f" `{k}={v}`" for k, v in values.items())
        cells = [name, what, setting, ",".join(str(r["seed"]) for r in recs)]
        cells += [pm(mean_std([r[k] for r in recs])) for k, _ in METRICS]
        cells += [pm(paired_difference(records, name, reference)) if name != reference else "-"]
        cells += [pm(mean_std([r[k] for r in recs])) for k, _ in END_METRICS]
        cells += [f"{sum(r['wall_seconds'] for r in recs) / len(recs) / 60:.2f}"]
        cells += [f"{sum(r['synthesis_seconds'] for r in recs) / len(recs):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Variant], dict[str, str]]:
    """The options, the variants to run (in order) and the overrides for every run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", nargs="*", help=f"default: all of {', '.join(VARIANTS)}; none: only --custom")
    parser.add_argument("--custom", action="append", default=[], help="extra variant 'name:key=value,key=value'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one torch thread each)")
    parser.add_argument("--reference", default="mean_only", help="variant the last accuracy is compared with")
    parser.add_argument("--out", default="bench/results/ablation", help="folder of ablation.md and runs.csv")
    parser.add_argument("--runs", default="runs/ablation", help="root of the run folders <variant>/seed<k>")
    parser.add_argument("--collect", action="store_true", help="run nothing: tabulate the finished runs only")
    args, extra = parser.parse_known_args(argv)
    try:
        import incremental_train_and_eval as engine

        overrides = engine.parse_run_overrides(extra)
        custom = dict(parse_custom(text) for text in args.custom)
    except (config.ConfigError, ValueError) as err:
        parser.error(str(err))
    names = args.variants if args.variants is not None else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return args, {**{n: VARIANTS[n] for n in names}, **custom}, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, variants, overrides = parse_args(argv)
    jobs = [
        (name, config_file, {**PROTOCOL, **overrides, **values, "progress": "false", "seed": str(seed)}, seed)
        for name, (config_file, values, _) in variants.items()
        for seed in args.seeds
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        runs = [(n, c, v, Path(args.runs) / n / f"seed{s}", args.collect) for n, c, v, s in jobs]
        results = [f.result() for f in [pool.submit(run_variant, *run) for run in runs]]
    records = [r for r in results if r is not None]
    if not records:
        print(f"no finished run under {args.runs}")
        return 1
    lines = [
        f"# CCSI ablation ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- command: `python bench/ablation.py {shlex.join(argv)}`",
        f"- machine: {describe_machine()}; {args.jobs} run(s) at a time, 1 torch thread each",
        "- protocol for every run: " + " ".join(f"`--{k}={v}`" for k, v in PROTOCOL.items()),
        "- overrides for every run (a variant's own values win): "
        + (" ".join(f"`--{k}={v}`" for k, v in overrides.items()) or "none"),
        f"- wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min"
        + (f" (--collect: {len(records)} of {len(jobs)} runs finished, the others left out)" if args.collect else ""),
        "- test accuracy (%) on all seen classes, mean ± sample std over seeds; Δ: paired by seed; min/run: wall "
        "time of one run (shared machine: compare within a table); synth s/run: synthesis seconds per run",
        "- last: old / new: accuracy on the classes before the last task / on the last task's classes, after it; "
        "old→new %: the share of the old classes' test images the final model predicts as a last-task class",
        "",
        *table(records, variants, args.reference),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
