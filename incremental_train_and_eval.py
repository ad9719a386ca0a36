"""The class-incremental task loop, the same for every method.

For each task (``run_task``): the method's ``begin_task`` -> the task's epochs (``task_training.fit_task``:
``training_step``, backward and optimiser step, optional per-epoch model selection) -> ``end_task`` ->
evaluation on the test images of all classes seen so far -> atomic checkpoint ``task_<t>.pt`` -> metrics and
plots. The data, split, net and method are built and checked against each other before any training
(``build_run``).
A run can continue from its last complete task (``resume: true``) or train one task from the
previous task's checkpoint (``task: t`` + ``saved_model_address``), as the original's per-task
sweeps do. Every task reseeds from (seed, task), so both give the same result as one run.
Launched with ``torchrun``, every rank runs this loop on its shard of each batch (see distributed.py);
only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dataloaders
import models
from dataloaders.image_set import DataSplits
from dataloaders.scenario import Scenario
from experiment import config, key_reference, provenance
from experiment.checkpoint import (
    TaskCheckpoint,
    partial_checkpoint_path,
    rng_state,
    set_rng_state,
    task_checkpoint_path,
)
from experiment.config import Config, Option, register_options
from experiment.errors import CheckpointError
from experiment.identity import check_same_experiment, check_same_run
from experiment.run_folder import RunFolder, plan_run, resolve_output_dir
from methods import build_method, method_class
from methods.base import Method, TaskContext
from reporting.loggers import RunLogger, build_logger
from reporting.metrics import RunMetrics, evaluate_predictions
from reporting.plots import run_title, write_run_plots
from runtime import distributed, precision
from runtime.data_access import DataAccess
from training.task_training import fit_task, predict_labels
from tuning.best import resolve_saved_model_address

log = logging.getLogger(__name__)
LOADED_CODE = provenance.git_commit()  # the checkout this process's code was imported from (recorded by each run)

register_options(
    "run",
    [
        Option("seed", "int", 0, "random seed; each task reseeds from (seed, task)", min=0, scope="experiment"),
        Option(
            "device", "str", "auto", "where to train: auto picks cuda when available", choices=("auto", "cpu", "cuda")
        ),
        Option(
            "save_every_epochs",
            "int",
            0,
            "also save the task in progress every k epochs (task_<t>_partial.pt: net, optimiser, scheduler, model "
            "selection, random states; removed when the task completes); 0: whole tasks only",
            min=0,
        ),
        Option("progress", "bool", True, "show progress bars"),
        Option("eval_batch_size", "int", 500, "batch size for evaluation", min=1),
        Option(
            "threads",
            "int",
            0,
            "CPU threads torch uses in this process (torch.set_num_threads, set before the run); 0: torch's default. "
            "On a CPU shared with other work, 1 is often fastest",
            min=0,
        ),
    ],
    scope="run",
)


def load_run_config(
    files: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None, args: Sequence[str] = ()
) -> Config:
    """The one way every entry point (main.py and its commands, the sweep runner, bench scripts, tests) loads a
    run's configuration: this module imports every module that declares keys (data, models, methods, training,
    runtime, reporting, run folder), so the key set is the same however the program was started. ``args`` are
    command-line overrides (``--key=value``, ``--key value``, a bare ``--flag`` of a bool key); ``overrides``
    (a mapping) win over them."""
    return config.load_config(files, {**config.parse_overrides(args), **(overrides or {})})


def parse_run_overrides(args: Sequence[str]) -> dict[str, str]:
    """Command-line overrides (``--key=value``, ``--key value``, a bare ``--flag`` of a bool key) checked against
    every declared key, for scripts that merge them with values of their own before ``load_run_config``."""
    return config.parse_overrides(args)


def describe_keys(markdown: bool = False, **filters: str) -> str:
    """Every declared key: the Markdown table of docs/config.md, or plain text (filters: method, group, protocol)."""
    return key_reference.reference_table() if markdown else key_reference.keys_text(**filters)


register_options(
    "train",
    [
        Option("epochs", "int", 100, "training epochs per task (paper: 100)", min=0),
        Option("batch_size", "int", 40, "training batch size (paper: 40)", min=1),
        Option(
            "select_on",
            "str",
            "val",
            "model selection per task: keep the epoch with the best accuracy on val (all seen classes: old-class "
            "images), val_new (the task's new classes only), test, or the last epoch",
            choices=("val", "val_new", "test", "last"),
        ),
        Option(
            "augment",
            "str",
            "none",
            "batch augmentation of real images (paper: none)",
            choices=("none", "flip", "crop_flip"),
        ),
    ],
    scope="task",
)


def task_seed(seed: int, task: int) -> int:
    return seed * 1000 + task


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class RunState:
    """Everything the task loop carries from one task to the next."""

    cfg: Config
    splits: DataSplits
    scenario: Scenario
    method: Method
    metrics: RunMetrics
    device: torch.device
    output_dir: Path
    logger: RunLogger
    run_hash: str = ""  # the run's identity (identity.run_hash)
    code: dict[str, Any] = field(default_factory=dict)  # the commit and dirty flag this process runs (per task)


# ----- one task ----------------------------------------------------------------------------------------------


def task_context(state: RunState, task: int, cfg: Config, generator: torch.Generator) -> TaskContext:
    """What the method is given for ``task``: new classes, the real data it may use, the seeded generator.

    Old classes' images are handed over only to a method that trains on them (``uses_old_data``) or reads a held-out
    split (``reads_held_out``); the data-access audit counts them."""
    scenario, splits, method = state.scenario, state.splits, state.method
    new_classes = scenario.classes_of_task(task)
    seen = list(range(scenario.n_seen(task)))
    reads = method.reads_held_out(cfg)
    ctx = TaskContext(
        task=task,
        new_classes=new_classes,
        n_old=scenario.n_old(task),
        train=splits.train.of_classes(seen if method.uses_old_data else new_classes),
        val=splits.val.of_classes(seen if "val" in reads else new_classes),
        test=splits.test.of_classes(seen) if "test" in reads else None,
        device=state.device,
        output_dir=state.output_dir,
        generator=generator,
        log=state.logger,
        class_names=[splits.class_names[c] for c in scenario.class_order[: len(seen)]],
        title=run_title(cfg.dataset, cfg.method, cfg.protocol),
        access=DataAccess(scenario.n_old(task)),
    )
    for images in (ctx.train, ctx.val, ctx.test):
        if images is not None:
            ctx.access.record("context", images.y)
    return ctx


def run_task(state: RunState, task: int) -> None:
    """Train, adapt, evaluate and checkpoint one task."""
    cfg = state.cfg.for_task(task)
    scenario, method = state.scenario, state.method
    ctx = task_context(state, task, cfg, seed_everything(task_seed(cfg.seed, task)))
    log.info("task %d/%d: classes %s (%d train images)", task, scenario.num_tasks, ctx.new_classes, len(ctx.train))
    start = time.perf_counter()
    method.begin_task(ctx, cfg)
    distributed.prepare_model(method.net, cfg.sync_bn)
    prepared = time.perf_counter()
    training = fit_task(method, ctx, cfg, state.splits, state.cfg, on_epoch=history_writer(state))
    trained = time.perf_counter()
    method.end_task(ctx)
    ctx.access.record("memory", method.kept_real_labels())
    rank_fingerprints = distributed.broadcast_method_state(method)  # [] in a single process
    done = time.perf_counter()
    test_seen = state.splits.test.of_classes(list(range(ctx.n_seen)))
    evaluation = evaluate_predictions(
        predict_labels(method, test_seen, cfg.eval_batch_size), test_seen.y, scenario.task_sizes[:task]
    )
    extra = {
        "val_accuracy": val_accuracy(state, ctx.n_seen, cfg.eval_batch_size),
        "selected_epoch": training["selected_epoch"],
        "seconds_before_task": prepared - start,
        "seconds_training": trained - prepared,
        "seconds_after_task": done - trained,
        "history": training["history"],  # per epoch: lr, mean loss terms, monitored accuracy (history.csv)
        "data_access": ctx.access.counts(),  # real images of old classes that reached the method, per path
        "code": dict(state.code),  # the commit (and dirty flag) this task ran with: a resume may use another
    }
    if rank_fingerprints:
        extra["rank_state_fingerprints"] = rank_fingerprints  # method state of each rank before the broadcast
    state.metrics.add(task, evaluation, extra)
    if distributed.is_main():
        save_task(state, task, cfg)
        state.metrics.write_history(state.output_dir)
        log_task(state, task, evaluation, extra["val_accuracy"], training["selected_epoch"], done - start)


def history_writer(state: RunState) -> Callable[[list[dict[str, float]]], None] | None:
    """history.csv rewritten after every epoch (earlier tasks' rows, then the task in progress): a long task shows
    its progress in the file; rank 0 only."""
    if not distributed.is_main():
        return None
    return lambda epochs: state.metrics.write_history(state.output_dir, in_progress=epochs)


def val_accuracy(state: RunState, n_seen: int, batch_size: int) -> float | None:
    """Accuracy on the validation images of the seen classes, measured by the harness after the task (like the test
    accuracy, it never reaches the method); what sweeps choose hyper-parameters on. None without val images."""
    val = state.splits.val.of_classes(list(range(n_seen)))
    if len(val) == 0:
        return None
    return 100.0 * (predict_labels(state.method, val, batch_size) == val.y).float().mean().item()


def save_task(state: RunState, task: int, cfg: Config) -> None:
    """``task_<t>.pt`` (and the task's partial file removed)."""
    TaskCheckpoint(
        task=task,
        method_name=cfg.method,
        config=state.cfg.to_dict(),
        config_hash=state.run_hash,
        scenario=state.scenario.to_dict(),
        method=state.method.state_dict(),
        metrics=state.metrics.to_dict(),
        rng=rng_state(),
    ).save(task_checkpoint_path(state.output_dir, task))
    partial_checkpoint_path(state.output_dir, task).unlink(missing_ok=True)


def log_task(
    state: RunState, task: int, evaluation: Any, val: float | None, selected_epoch: int, seconds: float
) -> None:
    """The task's line on the console and its row in the run logger (test and val accuracy under their names)."""
    row = {"test_accuracy": evaluation.accuracy, "test_balanced_accuracy": evaluation.balanced_accuracy}
    state.logger.log_task(task, {**row, **({} if val is None else {"val_accuracy": val})})
    old = "-" if evaluation.old_accuracy is None else f"{evaluation.old_accuracy:.2f}"
    log.info(
        "task %d/%d: test accuracy %.2f%% on %d seen classes (old %s, new %.2f), val %s, selected epoch %s, %.1fs",
        task,
        state.scenario.num_tasks,
        evaluation.accuracy,
        evaluation.n_seen,
        old,
        evaluation.new_accuracy,
        "-" if val is None else f"{val:.2f}%",
        selected_epoch,
        seconds,
    )


# ----- the run -----------------------------------------------------------------------------------------------


def restore(state: RunState, ckpt: TaskCheckpoint, path: Path) -> None:
    """Load a task checkpoint into the run (method state, metrics so far, random state)."""
    if ckpt.method_name != state.cfg.method:
        raise CheckpointError(f"{path} was written by method '{ckpt.method_name}', not '{state.cfg.method}'")
    if ckpt.scenario != state.scenario.to_dict():
        raise CheckpointError(
            f"{path} was trained on another class split/order ({ckpt.scenario}); use the same dataset, "
            "nb_cl_fg, nb_cl and class_order"
        )
    try:
        state.method.load_state_dict(ckpt.method)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path} does not match this model/method ({str(err).splitlines()[0][:100]})") from None
    state.metrics = RunMetrics.from_dict(ckpt.metrics)
    set_rng_state(ckpt.rng)


def run(cfg: Config) -> dict[str, Any]:
    """Run (or continue) a class-incremental experiment; returns the metrics summary."""
    launch, device = distributed.setup(cfg.device, cfg.backend, cfg.dist_timeout_minutes)
    try:
        return _run(cfg, device, main_process=launch.rank == 0)
    finally:
        distributed.teardown()


def build_run(cfg: Config, device: torch.device) -> RunState:
    """Data on the device, the class split, the net and the method, checked against each other before training."""
    with distributed.main_first():  # one download, not one per rank
        splits, scenario = dataloaders.prepare(cfg)
    config.check_per_task(cfg, scenario.num_tasks)
    dataloaders.check_run_splits(cfg, splits, scenario)
    splits = DataSplits(
        splits.name,
        splits.train.to(device),
        splits.val.to(device),
        splits.test.to(device),
        splits.num_classes,
        splits.class_names,
    )
    method_class(cfg.method).check(cfg, scenario.task_sizes)
    torch.manual_seed(cfg.seed)
    net = precision.prepare_model(models.build_net(cfg, splits.channels, splits.image_size).to(device), cfg, device)
    method = build_method(cfg, net, device)
    return RunState(cfg, splits, scenario, method, RunMetrics(), device, Path(cfg.output_dir), RunLogger())


def continued_checkpoint(cfg: Config) -> tuple[Config, TaskCheckpoint | None]:
    """The checkpoint ``saved_model_address`` names (``best:<folder>`` resolved), checked against ``cfg``."""
    if cfg.saved_model_address is not None:  # a name too long for the file system: one line, not an OSError
        config.check_path_names("saved_model_address", Path(cfg.saved_model_address.removeprefix("best:")))
    cfg = resolve_saved_model_address(cfg)
    if cfg.saved_model_address is None:
        return cfg, None
    parent = TaskCheckpoint.load(cfg.saved_model_address)
    check_same_experiment(parent.config, cfg, cfg.saved_model_address)
    return cfg, parent


def start_run(state: RunState, parent: TaskCheckpoint | None, main_process: bool) -> list[int]:
    """Plan the tasks (guards of the run folder), restore the checkpoint continued from; returns the tasks."""
    cfg, folder = state.cfg, RunFolder(state.output_dir)
    parent_path = None if parent is None else Path(cfg.saved_model_address)
    with distributed.main_first():  # rank 0 moves an overwritten run's files before the others look
        if main_process:
            folder.remove_stale_temporaries()
        plan = plan_run(cfg, folder, state.scenario.num_tasks, None if parent is None else parent.task, parent_path)
    if plan.resume:
        ckpt = TaskCheckpoint.load(plan.restore)
        check_same_run(ckpt.config, cfg, str(plan.restore))
        restore(state, ckpt, plan.restore)
        if main_process:
            for t in range(1, ckpt.task + 1):  # a task in progress saved just before its task_<t>.pt was written
                partial_checkpoint_path(state.output_dir, t).unlink(missing_ok=True)
            note_code_change(state, ckpt.task)
        if plan.first > plan.last:
            log.info("resuming %s: every task is trained; writing the run's outputs", state.output_dir)
        else:
            log.info("resuming %s after task %d", state.output_dir, ckpt.task)
    elif parent is not None:
        restore(state, parent, parent_path)
    return list(range(plan.first, plan.last + 1))


def note_code_change(state: RunState, task: int) -> None:
    """One line when a resumed run goes on with other code than its tasks so far ran (another commit, or
    uncommitted changes); each task records its own in metrics.json (``tasks[i].code``)."""
    before = state.metrics.extras[task - 1].get("code", {}) if len(state.metrics) >= task else {}
    now = state.code
    if before.get("commit") == now.get("commit") and not now.get("dirty") and not before.get("dirty"):
        return
    log.warning(
        "resuming with other code than task %d ran with: %s now, %s then (each task's commit is recorded in "
        "metrics.json)",
        task,
        _code_text(now),
        _code_text(before) if before else "unrecorded",
    )


def _code_text(code: dict[str, Any]) -> str:
    return f"commit {str(code.get('commit', 'unknown'))[:12]}" + (
        " with uncommitted changes" if code.get("dirty") else ""
    )


def _run(cfg: Config, device: torch.device, main_process: bool) -> dict[str, Any]:
    if not main_process:
        cfg = cfg.replace(progress=False)  # one set of progress bars: rank 0's
    cfg, parent = continued_checkpoint(cfg)
    output_dir, run_hash = resolve_output_dir(cfg, None if parent is None else parent.config_hash)
    cfg = cfg.replace(output_dir=str(output_dir))
    state = build_run(cfg, device)
    state.run_hash = run_hash
    state.code = provenance.process_code(LOADED_CODE)
    with contextlib.ExitStack() as lock:
        with distributed.main_first():  # a folder in use stops every rank, not only rank 0
            if main_process:
                lock.enter_context(RunFolder(output_dir).lock())
        tasks = start_run(state, parent, main_process)
        if main_process:
            config_file = output_dir / ("config.yaml" if cfg.task is None else f"config_task_{cfg.task}.yaml")
            if not (cfg.resume and config_file.exists()):
                cfg.save(config_file)
            state.logger = build_logger(cfg, output_dir)
            state.logger.log_config(cfg.to_dict())
        log.info(
            "%s on %s: %d tasks %s, device %s, output %s",
            cfg.method,
            cfg.dataset,
            state.scenario.num_tasks,
            state.scenario.task_sizes,
            device,
            output_dir,
        )
        try:
            for task in tasks:
                run_task(state, task)
            summary = finish_run(state, main_process)
        finally:
            state.logger.finish()
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "protocol": cfg.protocol,
        "output_dir": str(output_dir),
        **summary,
    }


def finish_run(state: RunState, main_process: bool) -> dict[str, Any]:
    """The run's summary; rank 0 writes history.csv, the plots, the logger's summary and, last (so that its presence
    says the run's outputs are complete), metrics.json/csv with the provenance. A resume after the last task redoes
    exactly this."""
    summary = state.metrics.summary()
    if main_process:
        state.metrics.write_history(state.output_dir)
        class_names = [state.splits.class_names[c] for c in state.scenario.class_order]
        title = run_title(state.cfg.dataset, state.cfg.method, state.cfg.protocol)
        for path in write_run_plots(state.output_dir, summary, class_names, title):
            if path.suffix == ".png":  # the .pdf twins stay in the run folder
                state.logger.log_image(path.stem, path)
        state.logger.log_summary(summary)
        info = provenance.collect(state.cfg, state.device, state.run_hash, provenance.process_code(LOADED_CODE))
        state.metrics.write(state.output_dir, info, state.cfg.to_dict())
    return summary
