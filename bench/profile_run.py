"""Where a run's time goes: the engine under cProfile (one torch thread), summed into named stages.

Runs each ``--config`` through ``incremental_train_and_eval.run`` under cProfile and prints, per run, the
seconds of the training loop's parts (batches, forward, teacher forward, losses, backward, optimiser, the
loop's own Python), of per-epoch model selection, of CCSI synthesis (teacher forward with moment hooks,
moments, TV, jitter/flip, keep-best, input gradient, Adam) and of the rest. A stage's seconds are cProfile's
cumulative time of a function (called from a given caller): they include the profiler's own overhead,
which is small next to the convolutions here but inflates Python-heavy parts somewhat.

Example:
    .venv/bin/python bench/profile_run.py --config configs/digits/ccsi.yaml --epochs=2 --syn_iterations=10
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval as engine
from models.network import IncrementalNet

# (label, function (file suffix, name), caller (file suffix, name) or None = every caller)
ENGINE, CCSI, TRAIN = "incremental_train_and_eval.py", "continual_class_specific_impression.py", "task_training.py"
MODULE, LOSSES = "torch/nn/modules/module.py", "synthesis_losses.py"
STAGES = [
    ("run (total, after imports)", (ENGINE, "_run"), None),
    ("training loop (fit_task)", (TRAIN, "fit_task"), None),
    ("  batches (BatchLoader: draw, gather, mix)", ("dataloaders/batches.py", "__iter__"), None),
    ("  training_step", ("", "training_step"), (TRAIN, "train_epoch")),
    (STUDENT := "    net forwards (main + IdC target)", (MODULE, "_wrapped_call_impl"), ("", "training_step")),
    (TEACHER := "    teacher forward (distillation target)", ("profile_run.py", "teacher_forward"), None),
    ("  backward", ("distributed.py", "backward"), (TRAIN, "train_epoch")),
    ("  optimiser step", ("precision.py", "optimizer_step"), (TRAIN, "train_epoch")),
    ("  zero_grad", ("torch/optim/optimizer.py", "zero_grad"), (TRAIN, "train_epoch")),
    (SELECT := "  model selection: accuracy on val", (TRAIN, "accuracy"), (TRAIN, "fit_task")),
    ("  model selection: state_dict deepcopy", ("copy.py", "deepcopy"), (TRAIN, "update")),
    ("before_task (incl. synthesis)", ("", "before_task"), ("methods/base.py", "begin_task")),
    ("  synthesis (synthesize)", (CCSI, "synthesize"), None),
    ("    loss forward (impression_loss)", (LOSSES, "impression_loss"), (CCSI, "_optimise")),
    (
        SYNTHESIS_TEACHER := "      teacher forward with moment hooks",
        (MODULE, "_wrapped_call_impl"),
        (LOSSES, "impression_loss"),
    ),
    ("      moments (group_moments)", (LOSSES, "group_moments"), None),
    ("      moment loss (vector norms)", (LOSSES, "moment_loss"), None),
    ("      total variation", (LOSSES, "total_variation"), None),
    ("      image L2", (LOSSES, "image_l2"), None),
    ("    jitter/flip gather (augment)", (CCSI, "augment"), None),
    ("    input gradient (autograd.grad)", ("torch/autograd/__init__.py", "grad"), (CCSI, "_optimise")),
    ("    keep-best copies (keep_best)", (CCSI, "keep_best"), None),
    ("    Adam step", ("torch/optim/optimizer.py", "wrapper"), (CCSI, "_optimise")),
    ("    progress bar", ("tqdm/std.py", "update"), (CCSI, "_optimise")),
    ("after_task (class statistics, herding)", ("", "after_task"), ("methods/base.py", "end_task")),
    (EVAL := "final evaluation (predict_labels)", (TRAIN, "predict_labels"), None),
    ("checkpoints (save_atomic)", ("checkpoint.py", "save_atomic"), None),
    ("plots", ("plots.py", "write_run_plots"), None),
    ("data set preparation", ("dataloaders/__init__.py", "prepare"), None),
]
LOOP_REST = "  rest of the loop: its own Python (loss sums, records), no-op collectives"
RUN_REST = "rest of the run (imprinting, teacher copy, logging)"


def teacher_forward(self: IncrementalNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's forward under its own name, so that cProfile tells it from the student's."""
    return IncrementalNet.forward(self, x)


def name_teacher_forwards() -> None:
    """Make every frozen copy (a teacher) run ``teacher_forward``."""
    copy_frozen = IncrementalNet.copy_frozen

    def named(self: IncrementalNet) -> IncrementalNet:
        teacher = copy_frozen(self)
        teacher.forward = types.MethodType(teacher_forward, teacher)
        return teacher

    IncrementalNet.copy_frozen = named


def seconds(stats: dict, function: tuple[str, str], caller: tuple[str, str] | None) -> tuple[float, int]:
    """Cumulative seconds and calls of ``function`` (from ``caller``), summed over matching entries."""
    total, calls = 0.0, 0
    for (path, _, name), (_, ncalls, _, cumtime, callers) in stats.items():
        if name != function[1] or not path.endswith(function[0]):
            continue
        if caller is None:
            total, calls = total + cumtime, calls + ncalls
            continue
        for (cpath, _, cname), (_, cn, _, ct) in callers.items():
            if cname == caller[1] and cpath.endswith(caller[0]):
                total, calls = total + ct, calls + cn
    return total, calls


def profile_one(files: list[str], overrides: dict[str, str]) -> list[tuple[str, float, int]]:
    """Run one config under cProfile; rows (stage, seconds, calls)."""
    cfg = engine.load_run_config(files, {"progress": "false", "overwrite": "true", **overrides})
    profiler = cProfile.Profile(time.thread_time)  # CPU time of this thread: robust to a busy machine
    profiler.runcall(engine.run, cfg)
    stats = pstats.Stats(profiler).stats
    rows = {label: seconds(stats, fn, caller) for label, fn, caller in STAGES}
    # teacher_forward also runs in synthesis; the student's forwards from training_step include the teacher's
    outside = [seconds(stats, (MODULE, "_wrapped_call_impl"), (CCSI, f)) for f in ("synthesize", "teacher_accuracy")]
    teacher, calls = seconds(stats, ("profile_run.py", "teacher_forward"), None)
    teacher -= sum(s for s, _ in outside) + rows[SYNTHESIS_TEACHER][0]
    calls -= sum(n for _, n in outside) + rows[SYNTHESIS_TEACHER][1]
    rows[TEACHER] = (teacher, calls)
    student, n = rows[STUDENT]
    rows[STUDENT] = (student - teacher, n - calls)
    rows[EVAL] = (rows[EVAL][0] - rows[SELECT][0], rows[EVAL][1] - rows[SELECT][1])  # predict_labels outside selection
    labels = [label for label, _, _ in STAGES]
    loop = labels.index("training loop (fit_task)")
    parts = [label for label in labels[loop + 1 : labels.index("before_task (incl. synthesis)")] if label[2] != " "]
    rows[LOOP_REST] = (rows[labels[loop]][0] - sum(rows[p][0] for p in parts), 1)
    stages = [label for label in labels[1:] if not label.startswith(" ")]
    rows[RUN_REST] = (rows[labels[0]][0] - sum(rows[p][0] for p in stages), 1)
    labels.insert(labels.index("before_task (incl. synthesis)"), LOOP_REST)
    return [(label, *rows[label]) for label in [*labels, RUN_REST]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", action="append", required=True, help="config file; repeat for several runs")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--work", default="/tmp/profile_run", help="run folders (<work>/<config stem>)")
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    overrides = engine.parse_run_overrides(extra)
    name_teacher_forwards()
    for path in args.config:
        start = time.process_time()
        rows = profile_one([path], {"output_dir": f"{args.work}/{Path(path).stem}", **overrides})
        total = rows[0][1]
        print(f"\n## {path} {' '.join(extra)} (CPU time {time.process_time() - start:.1f} s, {args.threads} thread)")
        print("| stage | s | % of run | calls |\n|---|---:|---:|---:|")
        for label, secs, calls in rows:
            if calls:
                indent = (len(label) - len(label.lstrip())) // 2
                print(f"| {'&nbsp;' * 2 * indent}{label.strip()} | {secs:.2f} | {100 * secs / total:.1f} | {calls} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
