"""One task's training: the epoch loop, per-epoch model selection, partial saves inside a task, evaluation.

``fit_task`` runs the epochs of the task the engine (``incremental_train_and_eval.run_task``) prepared:
``train_epoch`` (optimiser steps over the method's batches, sharded under torchrun), a finite-loss check,
model selection (``ModelSelector``: the epoch with the best accuracy on the monitored split, or the last),
the lr schedule, logging, and ``task_<t>_partial.pt`` every ``save_every_epochs`` epochs, from which
``--resume`` continues inside the task (``start_training``).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataloaders.batches import Batch
from dataloaders.image_set import DataSplits, ImageSet, as_float
from experiment.checkpoint import PartialCheckpoint, partial_checkpoint_path, rng_state, set_rng_state
from experiment.config import Config, ConfigError, Option, register_options
from experiment.errors import CheckpointError, TrainingError
from experiment.identity import check_same_run
from methods.base import Method, TaskContext
from reporting.progress import TaskProgress
from runtime import distributed, precision
from training.optimization import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

register_options(
    "train",
    [
        Option(
            "divergence_limit",
            "float",
            1e5,
            "stop the run (one line, exit 2) when a weight's magnitude exceeds this after an epoch: training diverged "
            "(a non-finite weight or loss always stops it); 0: only non-finite values",
            min=0,
        )
    ],
    scope="run",
)


@torch.no_grad()
def predict_labels(method: Method, images: ImageSet, batch_size: int) -> torch.Tensor:
    """Predicted class-order labels (N,) for every image, in eval mode (under torchrun: each rank a part)."""
    method.eval()
    part = images.x[distributed.shard_range(len(images))]
    with precision.autocast(method.cfg, method.device):
        preds = [method.predict(as_float(part[i : i + batch_size])).argmax(1) for i in range(0, len(part), batch_size)]
    local = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=images.y.device)
    return distributed.all_gather_rows(local)


def accuracy(method: Method, images: ImageSet, batch_size: int) -> float:
    if len(images) == 0:
        raise ConfigError("model selection/plateau needs a non-empty split, but it holds no image of the seen classes")
    return 100.0 * (predict_labels(method, images, batch_size) == images.y).float().mean().item()


class ModelSelector:
    """Keeps the net's state at the epoch with the best monitored accuracy; inactive for ``select_on: last``."""

    def __init__(self, active: bool, epochs: int):
        self.active = active
        self.best_accuracy = -math.inf
        self.best_state: dict[str, Any] | None = None
        self.best_epoch = epochs  # the last epoch, unless a better one is seen

    def update(self, epoch: int, accuracy: float, net: torch.nn.Module) -> None:
        """Record ``epoch`` (1-based) if its accuracy beats every earlier one (ties keep the earlier epoch)."""
        if self.active and accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch = accuracy, epoch
            self.best_state = copy.deepcopy(net.state_dict())

    def restore(self, net: torch.nn.Module) -> None:
        """Load the selected epoch's state into ``net`` (nothing to do when the last epoch is kept)."""
        if self.best_state is not None:
            net.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy, "best_state": self.best_state, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy, self.best_state = state["best_accuracy"], state["best_state"]
        self.best_epoch = state["best_epoch"]


def held_out_split(splits: DataSplits, ctx: TaskContext, name: str) -> ImageSet | None:
    """The engine's held-out images ``name``: val / test of the seen classes, val_new of the task's new classes,
    none for ``last``. Model selection and the lr monitor read them; the method never does."""
    seen = list(range(ctx.n_seen))
    splits = {
        "val": (splits.val, seen),
        "val_new": (splits.val, ctx.new_classes),
        "test": (splits.test, seen),
    }
    if name not in splits:
        return None
    images, classes = splits[name]
    return images.of_classes(classes)


def monitored_splits(splits: DataSplits, ctx: TaskContext, cfg: Config) -> dict[str, ImageSet]:
    """The splits evaluated after each epoch, by name: ``select_on``'s (model selection) and, for a plateau
    scheduler, ``lr_monitor``'s (one evaluation when they are the same)."""
    names = [cfg.select_on] + ([cfg.lr_monitor] if cfg.scheduler.startswith("plateau") else [])
    out = {}
    for name in dict.fromkeys(names):
        images = held_out_split(splits, ctx, name)
        if images is not None:
            out[name] = images
    return out


def evaluate_monitors(
    method: Method, monitors: dict[str, ImageSet], ctx: TaskContext, batch_size: int
) -> dict[str, float]:
    """Accuracy of the method on each monitored split, counted by the data-access audit (path ``selection``)."""
    out = {}
    for name, images in monitors.items():
        ctx.access.record("selection", images.y)
        out[name] = accuracy(method, images, batch_size)
    return out


def monitor_record(accuracies: dict[str, float], cfg: Config) -> dict[str, float]:
    """The epoch record's ``monitor_accuracy`` (model selection's split, else the lr monitor's) and, when the lr
    monitor watches another split, ``lr_monitor_accuracy``."""
    if not accuracies:
        return {}
    main = cfg.select_on if cfg.select_on in accuracies else cfg.lr_monitor
    record = {"monitor_accuracy": accuracies[main]}
    if cfg.lr_monitor in accuracies and cfg.lr_monitor != main:
        record["lr_monitor_accuracy"] = accuracies[cfg.lr_monitor]
    return record


def train_epoch(
    method: Method, ctx: TaskContext, epoch: int, training: TaskTraining, progress: TaskProgress | None = None
) -> dict[str, float]:
    """One epoch of optimiser steps over ``method.train_batches``; returns the mean of each loss term."""
    method.train()
    method.on_epoch_start(ctx, epoch)
    batches: Iterable = method.train_batches(ctx, epoch)
    if progress is not None:
        progress.start_epoch(epoch, batches)
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for batch in batches:
        local = distributed.shard_batch(batch)  # the whole batch in a single process
        if local is None:
            continue
        real = ~batch.synthetic if batch.valid is None else ~batch.synthetic & batch.valid
        ctx.access.record("train_batches", batch.y, real)  # the global batch, once; padding rows are not seen
        assert training.step is not None, "TaskTraining.step is set by capture_steps"
        terms = training.step(method.before_step(local), len(batch))
        method.after_step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.float()
        steps += 1
        if progress is not None:
            progress.step()
    return distributed.end_epoch(method.net, sums, steps)


def optimiser_step(method: Method, training: TaskTraining, local: Batch, rows: int) -> dict[str, torch.Tensor]:
    """One optimiser step on this process's ``local`` rows of a global batch of ``rows`` rows: the method's loss
    terms, backward (gradients summed over ranks), the step; returns the terms, detached. ``compile: graphs``
    captures it whole (``precision.capture_step``)."""
    with precision.autocast(method.cfg, method.device):  # fp32: no autocast at all
        terms = method.training_step(local)
    training.opt.zero_grad(set_to_none=True)
    loss = precision.scale_loss(terms["loss"], training.scaler)
    distributed.backward(loss, len(local) / rows, training.params)
    precision.optimizer_step(training.opt, training.scaler)
    return {name: value.detach() for name, value in terms.items()}


def capture_steps(method: Method, training: TaskTraining, cfg: Config) -> None:
    """Set ``training.step``: ``optimiser_step`` on ``method`` and ``training``, captured under ``compile: graphs``."""
    training.step = precision.capture_step(functools.partial(optimiser_step, method, training), cfg, method.device)


def check_finite(means: dict[str, float], task: int, epoch: int, cfg: Config, output_dir: Path) -> None:
    """Stop with one line when a loss term is not finite."""
    bad = [name for name, value in means.items() if not math.isfinite(value)]
    if bad:
        raise TrainingError(
            f"task {task} epoch {epoch}: loss term '{bad[0]}' is {means[bad[0]]}; "
            f"lower lr (now {cfg.lr}) or check the data; {_saved_so_far(task, output_dir)}"
        )


@torch.no_grad()
def check_weights(net: torch.nn.Module, task: int, epoch: int, cfg: Config, output_dir: Path) -> None:
    """Stop with one line when a weight is not finite (a non-finite gradient reached it) or beyond
    ``divergence_limit`` in magnitude: training diverged, whatever the head (cosine logits stay bounded)."""
    named = [(name, p) for name, p in net.named_parameters() if p.numel()]
    if not named:
        return
    largest = torch.stack([p.detach().abs().amax().float() for _, p in named])  # one device sync per epoch
    worst = int(torch.nan_to_num(largest, nan=math.inf).argmax())
    value = float(largest[worst])
    limit = cfg.divergence_limit
    if math.isfinite(value) and (limit == 0 or value <= limit):
        return
    what = f"is {value}" if not math.isfinite(value) else f"reached |w| = {value:.3g} (> divergence_limit {limit:g})"
    raise TrainingError(
        f"task {task} epoch {epoch}: training diverged: weight '{named[worst][0]}' {what}; lower lr (now {cfg.lr}); "
        + _saved_so_far(task, output_dir)
    )


def _saved_so_far(task: int, output_dir: Path) -> str:
    return f"tasks before {task} are saved in {output_dir}" if task > 1 else "no task was completed"


@dataclass
class TaskTraining:
    """The optimiser, schedule and model selection of one task, and what its epochs recorded."""

    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    scheduler: Any
    selector: ModelSelector
    history: list[dict[str, float]]
    scaler: torch.amp.GradScaler | None = None  # precision fp16 only
    first_epoch: int = 0
    step: Callable[[Batch, int], dict[str, torch.Tensor]] | None = None  # optimiser_step, captured or not


def start_training(method: Method, ctx: TaskContext, cfg: Config, run_cfg: Config) -> TaskTraining:
    """Optimiser over the net's trainable parameters, lr schedule and model selection; from the saved epoch
    when resuming inside the task (``--resume`` with a ``task_<t>_partial.pt``)."""
    opt = build_optimizer([{"params": [p for p in method.net.parameters() if p.requires_grad]}], cfg)
    params = [p for group in opt.param_groups for p in group["params"]]
    selector = ModelSelector(cfg.select_on != "last", cfg.epochs)
    training = TaskTraining(
        opt, params, build_scheduler(opt, cfg), selector, [], precision.grad_scaler(cfg, ctx.device)
    )
    capture_steps(method, training, cfg)
    partial = load_partial(ctx, run_cfg)
    if partial is not None:
        method.net.load_state_dict(partial.net)
        opt.load_state_dict(partial.optimizer)
        if training.scheduler is not None:
            training.scheduler.load_state_dict(partial.scheduler)
        if training.scaler is not None:
            training.scaler.load_state_dict(partial.scaler)
        training.selector.load_state_dict(partial.selection)
        training.history, training.first_epoch = partial.history, partial.epoch
        ctx.generator.set_state(partial.generator)
        set_rng_state(partial.rng)
    return training


def load_partial(ctx: TaskContext, run_cfg: Config) -> PartialCheckpoint | None:
    """The saved state of the task in progress when resuming, else None; refuses one from another run (the rule
    of ``identity.check_same_run``, as for a finished task)."""
    task = ctx.task
    path = partial_checkpoint_path(ctx.output_dir, task)
    if not (run_cfg.resume and path.is_file()):
        return None
    partial = PartialCheckpoint.load(path)
    if partial.task != task:
        raise CheckpointError(f"{path} holds task {partial.task}, not {task}; delete it to restart task {task}")
    check_same_run(partial.config, run_cfg, str(path))
    log.info("resuming task %d after epoch %d from %s", task, partial.epoch, path)
    return partial


def save_partial(method: Method, ctx: TaskContext, training: TaskTraining, epoch: int, run_cfg: Config) -> None:
    """``task_<t>_partial.pt`` after ``epoch`` (1-based) epochs of the task in progress."""
    PartialCheckpoint(
        task=ctx.task,
        epoch=epoch,
        config=run_cfg.to_dict(),
        net=method.net.state_dict(),
        optimizer=training.opt.state_dict(),
        scheduler=training.scheduler.state_dict() if training.scheduler is not None else None,
        scaler=training.scaler.state_dict() if training.scaler is not None else None,
        selection=training.selector.state_dict(),
        history=training.history,
        generator=ctx.generator.get_state(),
        rng=rng_state(),
    ).save(partial_checkpoint_path(ctx.output_dir, ctx.task))


def fit_task(
    method: Method,
    ctx: TaskContext,
    cfg: Config,
    splits: DataSplits,
    run_cfg: Config,
    on_epoch: Callable[[list[dict[str, float]]], None] | None = None,
) -> dict[str, Any]:
    """The epochs of one task with per-epoch model selection; returns a record of the training.

    ``cfg``: the task's configuration (per_task applied); ``splits``: the held-out images model selection and the
    lr monitor read; ``run_cfg``: the whole run's configuration, saved with a task in progress; ``on_epoch``: called
    with the task's epoch records so far after each epoch (the engine writes history.csv)."""
    training = start_training(method, ctx, cfg, run_cfg)
    monitors = monitored_splits(splits, ctx, cfg)
    progress = TaskProgress(ctx.task, cfg.epochs, training.first_epoch, cfg.progress)
    for epoch in range(training.first_epoch, cfg.epochs):
        means = train_epoch(method, ctx, epoch, training, progress)
        check_finite(means, ctx.task, epoch + 1, cfg, ctx.output_dir)
        check_weights(method.net, ctx.task, epoch + 1, cfg, ctx.output_dir)
        record = {"epoch": epoch + 1, "lr": float(training.opt.param_groups[0]["lr"]), **means}
        accuracies = evaluate_monitors(method, monitors, ctx, cfg.eval_batch_size)
        if cfg.select_on in accuracies:
            training.selector.update(epoch + 1, accuracies[cfg.select_on], method.net)
        record.update(monitor_record(accuracies, cfg))
        if isinstance(training.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            training.scheduler.step(accuracies[cfg.lr_monitor])
        elif training.scheduler is not None:
            training.scheduler.step()
        training.history.append(record)
        ctx.log.log_scalars({f"task{ctx.task}/{k}": v for k, v in record.items() if k != "epoch"}, step=None)
        progress.end_epoch(record)
        if on_epoch is not None:
            on_epoch(training.history)
        k = cfg.save_every_epochs
        if k and (epoch + 1) % k == 0 and epoch + 1 < cfg.epochs and distributed.is_main():
            save_partial(method, ctx, training, epoch + 1, run_cfg)
    progress.close()
    training.selector.restore(method.net)
    return {"selected_epoch": training.selector.best_epoch, "history": training.history}
