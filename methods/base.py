"""The interface between the engine and a continual-learning method.

The engine (``incremental_train_and_eval.py``) drives every method the same way, per task:

1. ``begin_task(ctx, cfg)``: the base class does the bookkeeping (``self.cfg`` = this task's configuration,
   ``self.task``, ``self.n_old``, ``self.n_seen``, and ``self.teacher`` = a frozen copy of the net from task 2
   on when the class sets ``needs_teacher``), then calls the method's ``before_task(ctx)``: grow the head,
   prepare replay data (default: grow the head).
2. per epoch: ``on_epoch_start(ctx, epoch)``, then for every ``batch`` of ``train_batches(ctx, epoch)``:
   ``before_step(batch)`` (host-side work; returns the batch to train on), ``training_step(batch)`` -> dict of
   named loss terms with the total under ``"loss"``; the engine does backward and the optimiser step (over every
   parameter of ``self.net`` that requires grad), then calls ``after_step()``. Under ``compile: graphs`` the
   step (training_step, backward, optimiser step) is captured whole, so ``training_step`` must be tensor work
   only (no host draws, syncs or counting: those go in ``before_step``), and the last batch of an epoch comes
   padded (``Batch.valid``): a method whose losses leave the padding out sets ``masks_padded_rows``.
3. ``end_task(ctx)``: calls ``after_task(ctx)`` (herding, weight aligning, class statistics, ...), then drops
   the teacher.
4. evaluation with ``predict(x)`` (logits over the classes seen so far).

A method reads its task's configuration through ``self.cfg`` only. It never sees old classes' real
training images unless it sets ``uses_old_data`` (the ``joint`` upper bound): ``ctx.train`` holds only the
current task's classes. A method declares its own keys with ``config.register_options`` in its module, its
values of shared keys in ``defaults`` (used when the user did not set them) and ``requires`` (refused when the
user set another value), checks what it can before any training in ``check``, and registers itself with
``@register_method(name)`` (methods/registry.py). State that must survive a task (a rehearsal memory, class
statistics) is a part (``add_part``): saved and restored with the method's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import Batch, BatchLoader
from dataloaders.image_set import ImageSet, as_float
from experiment.config import Config, ConfigError
from methods import losses
from runtime.data_access import DataAccess


@dataclass
class TaskContext:
    """What a method is told about the task being learned (labels are class-order positions)."""

    task: int  # 1-based task number
    new_classes: list[int]  # labels learned in this task, contiguous: range(n_old, n_seen)
    n_old: int  # number of classes learned before this task
    train: ImageSet  # training images of this task's classes (all seen classes if uses_old_data)
    val: ImageSet  # validation images of this task's classes; of all seen classes if the method reads "val"
    test: ImageSet | None  # test images of seen classes: only for a method that reads "test" (reads_held_out)
    device: torch.device
    output_dir: Path
    generator: torch.Generator  # the task's seeded random stream for sampling and augmentation
    log: Any = None  # run logger (metrics/images), see loggers.py; may be None
    class_names: list[str] | None = None  # names of the seen classes, by label (class-order position)
    title: str = ""  # data set, method and protocol, for figures
    access: DataAccess | None = None  # the task's data-access audit (data_access.py); a fresh one when None

    def __post_init__(self) -> None:
        if self.access is None:
            self.access = DataAccess(self.n_old)

    @property
    def n_seen(self) -> int:
        return self.n_old + len(self.new_classes)

    @property
    def n_new(self) -> int:
        return len(self.new_classes)


class Part(Protocol):
    """State a method holds across tasks (a rehearsal memory, class statistics): saved in its checkpoints."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class KeepsRealImages(Protocol):
    """A part that holds real images (a rehearsal memory): the data-access audit counts them."""

    def real_labels(self) -> Tensor: ...


@torch.no_grad()
def extract_features(net: nn.Module, images: ImageSet, batch_size: int) -> Tensor:
    """Backbone features (N, D) of every image, in eval mode (the net's mode is restored afterwards)."""
    was_training = net.training
    net.eval()
    chunks = [net.features(as_float(images.x[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    net.train(was_training)
    if not chunks:
        return torch.empty(0, net.feature_dim, device=images.x.device)
    return torch.cat(chunks)


class Method:
    """Base class: plain cross-entropy training of ``self.net`` over the seen classes (the ``finetune`` method)."""

    name: ClassVar[str] = ""  # set by @register_method
    uses_old_data: ClassVar[bool] = False  # True only for upper bounds that may train on old real data
    needs_teacher: ClassVar[bool] = False  # begin_task snapshots a frozen copy of the net from task 2 on
    defaults: ClassVar[dict[str, Any]] = {}  # this method's values of shared keys, unless the user sets them
    requires: ClassVar[dict[str, Any]] = {}  # values of shared keys this method cannot run without
    masks_padded_rows: ClassVar[bool] = False  # its training_step leaves Batch.valid's padding out (compile: graphs)

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        self.check_requirements(cfg)
        self.cfg = cfg  # the configuration in force for the current task (per_task applied), set by begin_task
        self.net = net
        self.device = device
        self.task = 0  # the task being learned (1-based), 0 before the first
        self.n_old = 0  # classes learned before the current task
        self.n_seen = 0  # classes seen so far, including the task being learned
        self.teacher: nn.Module | None = None  # frozen previous model during tasks >= 2 (needs_teacher)
        self.parts: dict[str, Part] = {}

    def reads_held_out(self, cfg: Config) -> tuple[str, ...]:
        """Held-out splits of all seen classes ("val", "test") the method reads while training; the engine hands
        them in ``ctx.val`` / ``ctx.test`` (counted by the data-access audit). Default: none."""
        return ()

    def kept_real_labels(self) -> Tensor:
        """Labels of the real images the method's parts hold (``KeepsRealImages``); empty when it keeps none."""
        labels = [part.real_labels().cpu() for part in self.parts.values() if isinstance(part, KeepsRealImages)]
        return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    @classmethod
    def check_requirements(cls, cfg: Config) -> None:
        """Refuse a configuration that contradicts ``requires`` (load_config applies them; this guards direct use)."""
        for key, wanted in cls.requires.items():
            if getattr(cfg, key) != wanted:
                raise ConfigError(
                    f"method '{cls.name}' needs {key}: {wanted}, got {key}: {getattr(cfg, key)}; "
                    f"remove the key or set it to {wanted}"
                )
        if cfg.compile == "graphs" and not cls.masks_padded_rows:
            raise ConfigError(
                f"key 'compile': graphs pads each epoch's last batch, and method '{cls.name}' does not mask padded "
                "rows out of its losses (ccsi, finetune and joint do); use compile: true or false"
            )

    @classmethod
    def check(cls, cfg: Config, task_sizes: list[int]) -> None:
        """Refuse, before any training, settings that cannot work with these task sizes (e.g. a memory too small)."""

    def add_part(self, name: str, part: Any) -> Any:
        """Register state that the method's checkpoint saves and restores under ``name``; returns ``part``."""
        self.parts[name] = part
        return part

    # ----- task life cycle (engine side) ---------------------------------------------------
    def begin_task(self, ctx: TaskContext, cfg: Config) -> None:
        """Bookkeeping common to every method, then ``before_task``."""
        self.cfg = cfg
        self.task, self.n_old, self.n_seen = ctx.task, ctx.n_old, ctx.n_seen
        self.teacher = self.net.copy_frozen() if self.needs_teacher and ctx.task > 1 else None
        self.before_task(ctx)

    def end_task(self, ctx: TaskContext) -> None:
        """``after_task``, then the teacher is dropped (the next task snapshots the model it starts from)."""
        self.after_task(ctx)
        self.teacher = None

    # ----- task life cycle (method side) ---------------------------------------------------
    def before_task(self, ctx: TaskContext) -> None:
        """Grow the head for the new classes."""
        self.net.expand_head(ctx.n_new)

    def replay(self, ctx: TaskContext) -> tuple[ImageSet | None, float]:
        """Images mixed into the task's batches and their fraction of draws; default: none."""
        return None, 0.0

    def train_batches(self, ctx: TaskContext, epoch: int) -> Iterable[Batch]:
        """The batches of one epoch: the task's real data, shuffled, mixed with ``replay(ctx)`` if any."""
        images, ratio = self.replay(ctx)
        return BatchLoader(
            ctx.train,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            augment=self.cfg.augment,
            generator=ctx.generator,
            device=self.device,
            synthetic=images,
            synthetic_ratio=ratio,
            pad=self.cfg.compile == "graphs",
        )

    def on_epoch_start(self, ctx: TaskContext, epoch: int) -> None:
        """Called before each epoch's first batch (0-based epoch)."""

    def before_step(self, batch: Batch) -> Batch:
        """Called before every optimiser step, outside a captured step: draws, counts and caches the step needs;
        returns the batch ``training_step`` gets. Default: ``batch``."""
        return batch

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        """Loss terms for one batch; ``"loss"`` is the one the engine back-propagates. Base: CE over seen classes."""
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        if batch.valid is None:
            ce = F.cross_entropy(logits, batch.y)
        else:
            ce = losses.weighted_cross_entropy(logits, batch.y, None, batch.shard, batch.valid)
        return {"loss": ce, "ce": ce}

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to project weights back onto a constraint)."""

    def after_task(self, ctx: TaskContext) -> None:
        """Called after the task's training and model selection, before evaluation."""

    # ----- inference -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, n_seen) over the classes seen so far, for float images in [0, 1]."""
        return self.net(x)["logits"]

    def train(self) -> None:
        self.net.train()

    def eval(self) -> None:
        self.net.eval()

    # ----- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the current task: the net (with its layout) and the parts."""
        state = {"net": self.net.state_dict(), "head_layout": self.net.head_layout(), "n_seen": self.n_seen}
        return {**state, **{name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.set_head_layout(state["head_layout"])
        self.net.load_state_dict(state["net"])
        self.n_seen = state["n_seen"]
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
