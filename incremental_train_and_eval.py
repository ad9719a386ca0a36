"""The class-incremental task loop, the same for every method.

For each task: ``before_task`` -> epochs of ``training_step`` (the engine does backward and the
optimiser step) with optional per-epoch model selection -> ``after_task`` -> evaluation on the
test images of all classes seen so far -> atomic checkpoint ``task_<t>.pt`` -> metrics and plots.
A run can continue from its last complete task (``resume: true``) or train one task from the
previous task's checkpoint (``task: t`` + ``saved_model_address``), as the original's per-task
sweeps do. Every task reseeds from (seed, task), so both give the same result as one run.
Launched with ``torchrun``, every rank runs this loop on its shard of each batch (see distributed.py);
only rank 0 writes files.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import dataloaders
import distributed
import models
from checkpoint import (
    completed_tasks,
    load_checkpoint,
    partial_checkpoint_path,
    rng_state,
    save_atomic,
    set_rng_state,
    task_checkpoint_path,
)
from config import Config, ConfigError, Option, register_options, register_preset
from dataloaders.image_set import DataSplits, ImageSet, as_float
from dataloaders.scenario import Scenario
from distributed import resolve_device  # noqa: F401  (engine.resolve_device, used by bench/protocol_timing.py)
from errors import CheckpointError, TrainingError
from loggers import RunLogger, build_logger
from methods import build_method
from methods.base import Method, TaskContext
from metrics import RunMetrics, evaluate_predictions
from optimization import build_optimizer, build_scheduler
from plots import run_title, write_run_plots

log = logging.getLogger(__name__)

register_options(
    "run",
    [
        Option("seed", "int", 0, "random seed; each task reseeds from (seed, task)", min=0),
        Option(
            "device", "str", "auto", "where to train: auto picks cuda when available", choices=("auto", "cpu", "cuda")
        ),
        Option(
            "output_dir",
            "str",
            "runs/{dataset}/{method}/seed{seed}",
            "run folder (config, checkpoints, metrics, plots); {key} is replaced by that key's value",
        ),
        Option(
            "resume",
            "bool",
            False,
            "continue the run in output_dir from its last complete task (or from the task in progress, when "
            "save_every_epochs saved it)",
        ),
        Option(
            "save_every_epochs",
            "int",
            0,
            "also save the task in progress every k epochs (task_<t>_partial.pt: net, optimiser, scheduler, model "
            "selection, random states; removed when the task completes); 0: whole tasks only",
            min=0,
        ),
        Option("overwrite", "bool", False, "allow starting a new run in an output_dir that holds checkpoints"),
        Option(
            "task",
            "int",
            None,
            "train only this task (1-based); task > 1 needs saved_model_address",
            min=1,
            nullable=True,
        ),
        Option(
            "saved_model_address",
            "str",
            None,
            "checkpoint (task_<t>.pt) to continue from: trains task t+1 on",
            nullable=True,
        ),
        Option("progress", "bool", True, "show progress bars"),
        Option("eval_batch_size", "int", 500, "batch size for evaluation", min=1),
        Option(
            "protocol",
            "str",
            "clean",
            "preset of the switches for the released CCSI code's oddities: original = its behaviour (test split "
            "used for IdC and model selection, plateau-on-accuracy quirk, BN momentum 1); clean = val for both, "
            "no test image before the final evaluation. Results state the protocol that produced them",
            choices=("original", "clean"),
        ),
    ],
)
register_preset(
    "protocol",
    {
        "original": {
            "idc_source": "test",
            "select_on": "test",
            "scheduler": "plateau_original",
            "cn_momentum": 1.0,
            "class_stats": "running",
            "syn_cosine_factor": 0.2,
            "lamda_new_classes": "nb_cl",
        },
        "clean": {
            "idc_source": "val",
            "select_on": "val",
            "scheduler": "plateau",
            "cn_momentum": 0.1,
            "class_stats": "per_class",
            "syn_cosine_factor": 0.5,
            "lamda_new_classes": "actual",
        },
    },
)
register_options(
    "train",
    [
        Option("epochs", "int", 100, "training epochs per task (paper: 100)", min=0),
        Option("batch_size", "int", 40, "training batch size (paper: 40)", min=1),
        Option(
            "select_on",
            "str",
            "val",
            "model selection per task: keep the epoch with the best accuracy on val or test, or the last epoch",
            choices=("val", "test", "last"),
        ),
        Option(
            "augment",
            "str",
            "none",
            "batch augmentation of real images (paper: none)",
            choices=("none", "flip", "crop_flip"),
        ),
    ],
)


def task_seed(seed: int, task: int) -> int:
    return seed * 1000 + task


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def predict_labels(method: Method, images: ImageSet, batch_size: int) -> torch.Tensor:
    """Predicted class-order labels (N,) for every image, in eval mode (under torchrun: each rank a part)."""
    method.eval()
    part = images.x[distributed.shard_range(len(images))]
    preds = [method.predict(as_float(part[i : i + batch_size])).argmax(1) for i in range(0, len(part), batch_size)]
    local = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=images.y.device)
    return distributed.all_gather_rows(local)


def accuracy(method: Method, images: ImageSet, batch_size: int) -> float:
    if len(images) == 0:
        raise ConfigError("model selection/plateau needs a non-empty split, but it holds no image of the seen classes")
    return 100.0 * (predict_labels(method, images, batch_size) == images.y).float().mean().item()


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


# Keys that say how to run, not what to train: a task in progress may be resumed with other values.
RUN_CONTROL_KEYS = (
    *("resume", "overwrite", "progress", "save_every_epochs", "logger", "backend", "dist_timeout_minutes"),
    "threads",  # main.py's
)


def training_config(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in RUN_CONTROL_KEYS}


def load_partial(state: RunState, task: int) -> dict[str, Any] | None:
    """The saved state of ``task`` in progress when resuming, else None; refuses one from another run."""
    path = partial_checkpoint_path(state.output_dir, task)
    if not (state.cfg.resume and path.is_file()):
        return None
    partial = load_checkpoint(path)
    if partial.get("task") != task or partial.get("config") != training_config(state.cfg):
        raise CheckpointError(
            f"{path} was saved by a run with another configuration; delete it to restart task {task} from its start"
        )
    log.info("resuming task %d after epoch %d from %s", task, partial["epoch"], path)
    return partial


def train_task(state: RunState, ctx: TaskContext, partial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Epoch loop of one task with per-epoch model selection (from a saved epoch with ``partial``);
    returns a record of the training."""
    cfg, method = ctx.cfg, state.method
    opt = build_optimizer(method.parameter_groups(ctx), cfg)
    params = [p for group in opt.param_groups for p in group["params"]]
    sched = build_scheduler(opt, cfg)
    monitor = {"val": ctx.val, "test": ctx.test, "last": None}[cfg.select_on]
    if monitor is None and cfg.scheduler.startswith("plateau"):
        monitor = ctx.val
    best_acc, best_state, best_epoch = -math.inf, None, cfg.epochs
    history: list[dict[str, float]] = []
    first = 0
    if partial is not None:
        method.net.load_state_dict(partial["net"])
        opt.load_state_dict(partial["optimizer"])
        if sched is not None:
            sched.load_state_dict(partial["scheduler"])
        best_acc, best_state, best_epoch = partial["best_accuracy"], partial["best_state"], partial["best_epoch"]
        history, first = partial["history"], partial["epoch"]
        ctx.generator.set_state(partial["generator"])
        set_rng_state(partial["rng"])
    epochs = tqdm(
        range(first, cfg.epochs),
        desc=f"task {ctx.task}",
        disable=not cfg.progress,
        unit="epoch",
        leave=False,
        initial=first,
        total=cfg.epochs,
    )
    for epoch in epochs:
        method.train()
        method.on_epoch_start(ctx, epoch)
        batches = method.train_batches(ctx, epoch)
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for batch in batches:
            local = distributed.shard_batch(batch)  # the whole batch in a single process
            if local is None:
                continue
            terms = method.training_step(local)
            opt.zero_grad(set_to_none=True)
            (terms["loss"] * (len(local) / len(batch))).backward()  # this rank's share of the batch mean
            distributed.all_reduce_gradients(params)
            opt.step()
            method.after_step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            n += 1
        distributed.average_buffers(method.net)
        means = distributed.all_reduce_mean({name: (value / max(n, 1)).item() for name, value in sums.items()})
        bad = [name for name, value in means.items() if not math.isfinite(value)]
        if bad:
            raise TrainingError(
                f"task {ctx.task} epoch {epoch + 1}: loss term '{bad[0]}' is {means[bad[0]]}; "
                f"lower lr (now {cfg.lr}) or check the data; tasks before {ctx.task} are saved in {state.output_dir}"
            )
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **means}
        if monitor is not None:
            record["monitor_accuracy"] = acc = accuracy(method, monitor, cfg.eval_batch_size)
            if cfg.select_on != "last" and acc > best_acc:
                best_acc, best_epoch = acc, epoch + 1
                best_state = copy.deepcopy(method.net.state_dict())
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(record["monitor_accuracy"])
        elif sched is not None:
            sched.step()
        history.append(record)
        state.logger.log_scalars({f"task{ctx.task}/{k}": v for k, v in record.items() if k != "epoch"}, step=None)
        epochs.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("epoch", "lr")})
        k = cfg.save_every_epochs
        if k and (epoch + 1) % k == 0 and epoch + 1 < cfg.epochs and distributed.is_main():
            save_atomic(
                {
                    "format_version": 1,
                    "task": ctx.task,
                    "epoch": epoch + 1,
                    "config": training_config(state.cfg),
                    "net": method.net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "best_accuracy": best_acc,
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "history": history,
                    "generator": ctx.generator.get_state(),
                    "rng": rng_state(),
                },
                partial_checkpoint_path(state.output_dir, ctx.task),
            )
    if best_state is not None:
        method.net.load_state_dict(best_state)
    return {"selected_epoch": best_epoch, "select_on": cfg.select_on, "history": history}


def run_task(state: RunState, task: int) -> None:
    """Train, adapt, evaluate and checkpoint one task."""
    cfg = state.cfg.for_task(task)
    scenario, splits, method = state.scenario, state.splits, state.method
    generator = seed_everything(task_seed(cfg.seed, task))
    new_classes = scenario.classes_of_task(task)
    seen = list(range(scenario.n_seen(task)))
    test_seen = splits.test.of_classes(seen)
    wants_test = cfg.select_on == "test" or method.reads_test_split(cfg)
    ctx = TaskContext(
        task=task,
        cfg=cfg,
        new_classes=new_classes,
        n_old=scenario.n_old(task),
        train=splits.train.of_classes(seen if method.uses_old_data else new_classes),
        val=splits.val.of_classes(seen),
        test=test_seen if wants_test else None,
        device=state.device,
        output_dir=state.output_dir,
        generator=generator,
        log=state.logger,
    )
    log.info("task %d/%d: classes %s (%d train images)", task, scenario.num_tasks, new_classes, len(ctx.train))
    start = time.perf_counter()
    method.cfg = cfg  # the method reads this task's values (per_task applied) through self.cfg
    method.before_task(ctx)
    distributed.prepare_model(method.net, cfg.sync_bn)
    prepared = time.perf_counter()
    training = train_task(state, ctx, load_partial(state, task))
    trained = time.perf_counter()
    method.after_task(ctx)
    rank_fingerprints = distributed.broadcast_method_state(method)  # [] in a single process
    done = time.perf_counter()
    evaluation = evaluate_predictions(
        predict_labels(method, test_seen, cfg.eval_batch_size), test_seen.y, scenario.task_sizes[:task]
    )
    extra = {
        "selected_epoch": training["selected_epoch"],
        "seconds_before_task": prepared - start,
        "seconds_training": trained - prepared,
        "seconds_after_task": done - trained,
        "final_epoch": training["history"][-1] if training["history"] else {},
    }
    if rank_fingerprints:
        extra["rank_state_fingerprints"] = rank_fingerprints  # method state of each rank before the broadcast
    state.metrics.add(task, evaluation, extra)
    if not distributed.is_main():
        return
    save_atomic(
        {
            "format_version": 1,
            "task": task,
            "method_name": cfg.method,
            "config": state.cfg.to_dict(),
            "scenario": scenario.to_dict(),
            "method": method.state_dict(),
            "metrics": state.metrics.to_dict(),
            "rng": rng_state(),
        },
        task_checkpoint_path(state.output_dir, task),
    )
    partial_checkpoint_path(state.output_dir, task).unlink(missing_ok=True)
    row = {"task": task, "accuracy": evaluation.accuracy, "balanced_accuracy": evaluation.balanced_accuracy}
    state.logger.log_task(task, row)
    old = "-" if evaluation.old_accuracy is None else f"{evaluation.old_accuracy:.2f}"
    log.info(
        "task %d/%d: accuracy %.2f%% on %d seen classes (old %s, new %.2f), selected epoch %s, %.1fs",
        task,
        scenario.num_tasks,
        evaluation.accuracy,
        len(seen),
        old,
        evaluation.new_accuracy,
        training["selected_epoch"],
        done - start,
    )


def _restore(state: RunState, path: Path) -> int:
    """Load a checkpoint into the run; returns the task it completed."""
    ckpt = load_checkpoint(path)
    if ckpt["method_name"] != state.cfg.method:
        raise CheckpointError(f"{path} was written by method '{ckpt['method_name']}', not '{state.cfg.method}'")
    if ckpt["scenario"] != state.scenario.to_dict():
        raise CheckpointError(
            f"{path} was trained on another class split/order ({ckpt['scenario']}); use the same dataset, "
            "nb_cl_fg, nb_cl and class_order"
        )
    try:
        state.method.load_state_dict(ckpt["method"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path} does not match this model/method ({str(err).splitlines()[0][:100]})") from None
    state.metrics = RunMetrics.from_dict(ckpt["metrics"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["task"])


def plan_tasks(state: RunState) -> list[int]:
    """Which tasks this invocation trains, after restoring any earlier state."""
    cfg, out, num_tasks = state.cfg, state.output_dir, state.scenario.num_tasks
    done = completed_tasks(out)
    if cfg.task is not None:
        if cfg.task > num_tasks:
            raise ConfigError(f"key 'task': {cfg.task} is beyond the last task ({num_tasks})")
        if cfg.task > 1:
            if cfg.saved_model_address is None:
                raise ConfigError(
                    f"key 'task': task {cfg.task} needs --saved_model_address=<checkpoint of task {cfg.task - 1}>"
                )
            previous = _restore(state, Path(cfg.saved_model_address))
            if previous != cfg.task - 1:
                raise CheckpointError(
                    f"{cfg.saved_model_address} is the checkpoint of task {previous}, but task {cfg.task} needs "
                    f"that of task {cfg.task - 1}"
                )
        return [cfg.task]
    if cfg.saved_model_address is not None:
        first = _restore(state, Path(cfg.saved_model_address)) + 1
    elif cfg.resume and done:
        first = _restore(state, task_checkpoint_path(out, done[-1])) + 1
        log.info("resuming %s after task %d", out, first - 1)
    else:
        if done and not cfg.overwrite and not cfg.resume:
            raise ConfigError(
                f"output_dir {out} already holds checkpoints of tasks {done}; pass --resume=true to continue "
                "that run, --overwrite=true to replace it, or choose another --output_dir"
            )
        first = 1
    return list(range(first, num_tasks + 1))


def run(cfg: Config) -> dict[str, Any]:
    """Run (or continue) a class-incremental experiment; returns the metrics summary."""
    launch, device = distributed.setup(cfg.device, cfg.backend, cfg.dist_timeout_minutes)
    try:
        return _run(cfg, device, main_process=launch.rank == 0)
    finally:
        distributed.teardown()


def _run(cfg: Config, device: torch.device, main_process: bool) -> dict[str, Any]:
    if not main_process:
        cfg = cfg.replace(progress=False)  # one set of progress bars: rank 0's
    output_dir = Path(cfg.output_dir)
    with distributed.main_first():  # one download, not one per rank
        splits, scenario = dataloaders.prepare(cfg)
    splits = DataSplits(
        splits.name,
        splits.train.to(device),
        splits.val.to(device),
        splits.test.to(device),
        splits.num_classes,
        splits.class_names,
    )
    torch.manual_seed(cfg.seed)
    net = models.build_net(cfg, splits.channels, splits.image_size).to(device)
    method = build_method(cfg, net, device)
    state = RunState(cfg, splits, scenario, method, RunMetrics(), device, output_dir, RunLogger())
    tasks = plan_tasks(state)
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / "config.yaml")
        state.logger = build_logger(cfg, output_dir)
        state.logger.log_config(cfg.to_dict())
    log.info(
        "%s on %s: %d tasks %s, device %s, output %s",
        cfg.method,
        cfg.dataset,
        scenario.num_tasks,
        scenario.task_sizes,
        device,
        output_dir,
    )
    try:
        for task in tasks:
            run_task(state, task)
        summary = state.metrics.summary()
        if main_process:
            state.metrics.write(output_dir)
            class_names = [splits.class_names[c] for c in scenario.class_order]
            title = run_title(cfg.dataset, cfg.method, cfg.protocol)
            for path in write_run_plots(output_dir, summary, class_names, title):
                if path.suffix == ".png":  # the .pdf twins stay in the run folder
                    state.logger.log_image(path.stem, path)
    finally:
        state.logger.finish()
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "protocol": cfg.protocol,
        "output_dir": str(output_dir),
        **summary,
    }
