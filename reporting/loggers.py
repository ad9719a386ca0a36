"""Run loggers: one small interface in front of Weights & Biases, TensorBoard (or nothing).

wandb and tensorboard are optional: each is imported only when its logger is built (``import_optional``).

The trainer calls ``log_config`` once, ``log_scalars`` during training (losses, learning rate), ``log_task`` after
each task (accuracies, or the final summary), ``log_image`` for plots, and ``finish`` at the end.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from experiment import errors
from experiment.config import OPTIONS, Config, ConfigError, Option, register_options
from experiment.identity import config_hash, identity_values

log = logging.getLogger(__name__)

__all__ = [
    "MultiLogger",
    "RunLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "build_logger",
    "default_run_name",
    "wandb_credentials_found",
]

register_options(
    "logging",
    [
        Option("logger", "str", "none", "experiment trackers, comma-separated (wandb,tensorboard): none; wandb "
               "(offline when no API key; group: data set, method, protocol and config hash without the seed); "
               "tensorboard (event files in <output_dir>/tensorboard, hparams with the final metrics: tensorboard "
               "--logdir runs)", choices=("none", "wandb", "tensorboard", "wandb,tensorboard", "tensorboard,wandb")),
        Option("wandb_project", "str", "ccsi-cil", "wandb project name"),
        Option("wandb_entity", "str", None, "wandb entity (user or team); null: the account's default",
               nullable=True),
        Option("wandb_run_name", "str", None, "wandb run name; null: the result-changing keys set on the command line "
               "(a sweep point's values) and the seed, else <dataset>-<method>-seed<seed>", nullable=True),
    ],
    scope="run",
)  # fmt: skip


class RunLogger:
    """Logger that records nothing; the base class of the real ones."""

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the resolved configuration."""

    def log_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        """Record scalar values at ``step`` (a global, non-decreasing counter); None: the next step."""

    def log_task(self, task: int, summary_or_row: dict[str, Any]) -> None:
        """Record the metrics after ``task`` (1-based): one metrics row, or the run summary at the end."""

    def log_image(self, name: str, path: str | Path) -> None:
        """Record an image file (a plot, an impressions grid)."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Record the run's final metrics (``RunMetrics.summary()``, also for a run that trained one task)."""

    def finish(self) -> None:
        """Flush and close; safe to call twice."""


# Scalars of RunMetrics.summary() logged at the end of a run (wandb: run summary keys "final/<key>").
SUMMARY_KEYS = (
    "average_incremental_accuracy",
    "last_accuracy",
    "forgetting",
    "backward_transfer",
    "last_val_accuracy",
    "average_incremental_val_accuracy",
    "num_tasks",
)


def wandb_credentials_found() -> bool:
    """Whether wandb can authenticate without prompting: WANDB_API_KEY, an identity token file, or a .netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if os.environ.get("NETRC"):
        candidates = [Path(os.environ["NETRC"]).expanduser()]
    else:
        candidates = [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return False
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as err:
        log.warning("wandb: could not read %s (%s); treating it as holding no API key", path, err)
        return False
    return bool(creds and creds[2])


def import_optional(module: str, package: str) -> ModuleType:
    """``module``, imported when the logger named ``package`` is built (slow, optional packages); when it cannot be,
    a one-line ConfigError naming the package to install."""
    return errors.import_optional(
        module, package, f"logger: {package}", "choose another logger (--logger=none)", ConfigError
    )


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class WandbLogger(RunLogger):
    """Logs to Weights & Biases; offline (files under ``output_dir``, sync later) when no API key is configured."""

    def __init__(
        self,
        cfg_dict: dict[str, Any],
        project: str,
        entity: str | None,
        run_name: str | None,
        output_dir: str | Path,
        group: str | None = None,
    ):
        wandb = import_optional("wandb", "wandb")
        self._wandb = wandb
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        offline = not os.environ.get("WANDB_MODE") and not wandb_credentials_found()
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=run_name,
            group=group,
            config=dict(cfg_dict),
            dir=str(out),
            mode="offline" if offline else None,
            reinit="create_new",  # several runs in one process (benchmarks) never share a run
        )
        self.run.define_metric("task/task")
        self.run.define_metric("task/*", step_metric="task/task")  # per-task curves use the task as x-axis
        self._step = 0
        if offline:
            sync_dir = self.run.settings.sync_dir
            log.warning("wandb: no API key found, logging offline to %s; sync later with `wandb sync %s`", sync_dir,
                        sync_dir)  # fmt: skip

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        step = self._step + 1 if step is None else int(step)
        if step < self._step:
            log.warning("wandb: step %d is before the last logged step %d; wandb will drop these values", step,
                        self._step)  # fmt: skip
        self._step = max(self._step, step)
        self.run.log(dict(scalars), step=step)

    def log_task(self, task: int, summary_or_row: dict[str, Any]) -> None:
        """Scalars go to the history under ``task/<key>`` (x-axis: task); lists (R, per-task curves) to the summary."""
        row: dict[str, Any] = {"task/task": task}
        for key, value in summary_or_row.items():
            if _is_scalar(value):
                row[f"task/{key}"] = value
            elif isinstance(value, list | tuple):
                self.run.summary[f"task/{key}"] = list(value)
        self._step += 1  # its own history row; a later training step equal to it is merged, not dropped
        self.run.log(row, step=self._step)

    def log_image(self, name: str, path: str | Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))}, step=self._step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The final scalars (average incremental, last, forgetting, backward transfer, val accuracies) go to the run
        summary as ``final/<key>``: what a sweep optimises and a table compares."""
        for key in SUMMARY_KEYS:
            if _is_scalar(summary.get(key)):
                self.run.summary[f"final/{key}"] = summary[key]

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardLogger(RunLogger):
    """Writes TensorBoard event files into ``<output_dir>/tensorboard``: the scalars wandb gets (training terms by
    global step, ``task/<key>`` by task, ``final/<key>`` at the end), the config as text and the figures."""

    def __init__(self, output_dir: str | Path):
        tensorboard = import_optional("torch.utils.tensorboard", "tensorboard")
        self.writer: Any = tensorboard.SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self._step = 0
        self.hparams: dict[str, Any] = {}  # set by log_config; written with the final metrics by log_summary

    def log_config(self, config: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows)
        self.hparams = tensorboard_hparams(config)

    def log_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        self._step = self._step + 1 if step is None else int(step)
        for key, value in scalars.items():
            if _is_scalar(value):
                self.writer.add_scalar(key, value, self._step)

    def log_task(self, task: int, summary_or_row: dict[str, Any]) -> None:
        for key, value in summary_or_row.items():
            if _is_scalar(value):
                self.writer.add_scalar(f"task/{key}", value, task)

    def log_image(self, name: str, path: str | Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(name, pixels, self._step, dataformats="HWC")

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key in SUMMARY_KEYS:
            if _is_scalar(summary.get(key)):
                self.writer.add_scalar(f"final/{key}", summary[key], 0)
        add_hparams(self.writer, self.hparams, summary)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_run_name(cfg: Config) -> str | None:
    """``wandb_run_name``; else the result-changing keys set on the command line and the seed ("lamda=3 lr=0.05
    seed1": by name, at most 128 characters); else <dataset>-<method>-seed<seed> from whichever of those keys the
    config has."""
    if cfg.wandb_run_name is not None:
        return cfg.wandb_run_name
    values = cfg.to_dict()
    keys = command_line_keys(cfg)
    if keys:
        text = " ".join(f"{k}={_short(v)}" for k, v in keys.items())
        seed = f" seed{values['seed']}" if values.get("seed") is not None else ""
        return (text if len(text) + len(seed) <= 128 else text[: 127 - len(seed)] + "…") + seed
    parts = [str(values[k]) for k in ("dataset", "method") if values.get(k) is not None]
    if values.get("seed") is not None:
        parts.append(f"seed{values['seed']}")
    return "-".join(parts) or None


def build_logger(cfg: Config, output_dir: str | Path) -> RunLogger:
    """The loggers named by the ``logger`` key (none: a RunLogger that records nothing; several: all of them)."""
    built: list[RunLogger] = []
    for name in logger_names(cfg.logger):
        if name == "wandb":
            built.append(
                WandbLogger(
                    cfg.to_dict(), cfg.wandb_project, cfg.wandb_entity, default_run_name(cfg), output_dir,
                    group=wandb_group(cfg.to_dict()),
                )
            )  # fmt: skip
        elif name == "tensorboard":
            built.append(TensorBoardLogger(output_dir))
    if not built:
        return RunLogger()
    return built[0] if len(built) == 1 else MultiLogger(built)


# ----- several loggers, wandb's group and name, TensorBoard's hparams ----------------------------------------------

LOGGERS = ("none", "wandb", "tensorboard")
GROUP_KEYS = ("dataset", "method", "protocol")  # in the wandb group; left out of the run name


def logger_names(value: str) -> list[str]:
    """The loggers of a ``logger`` value ("wandb,tensorboard"), in order, each once, "none" dropped; a ConfigError
    naming an unknown one."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"key 'logger': unknown logger {unknown[0]!r}; choose none, wandb, tensorboard or a "
                          "comma-separated list of them (wandb,tensorboard)")  # fmt: skip
    return [n for n in dict.fromkeys(names) if n != "none"]


class MultiLogger(RunLogger):
    """Hands every call to each of several loggers, in order."""

    def __init__(self, loggers: list[RunLogger]):
        self.loggers = list(loggers)

    def log_config(self, config: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_scalars(self, scalars: dict[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_scalars(scalars, step)

    def log_task(self, task: int, summary_or_row: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_task(task, summary_or_row)

    def log_image(self, name: str, path: str | Path) -> None:
        for logger in self.loggers:
            logger.log_image(name, path)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_summary(summary)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def wandb_group(values: dict[str, Any]) -> str:
    """The experiment a run belongs to: <dataset>-<method>-<protocol>-<config hash without the seed>; the runs of
    one configuration with different seeds share it."""
    parts = [str(values[k]) for k in GROUP_KEYS if values.get(k) is not None]
    return "-".join([*parts, config_hash({k: v for k, v in values.items() if k != "seed"})])


def command_line_keys(cfg: Config) -> dict[str, Any]:
    """The result-changing keys set on the command line (a sweep point's parameters), by name; not the group's
    keys, nor the seed."""
    pinned = cfg.__getstate__()["pinned"]  # the keys given as overrides (Config keeps them to win over per_task)
    values = cfg.to_dict()
    return {
        k: values[k]
        for k in sorted(pinned)
        if k in values and k in OPTIONS and OPTIONS[k].scope != "run" and k not in (*GROUP_KEYS, "seed")
    }


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def tensorboard_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """What TensorBoard's hparams view shows of a run: data set, method, protocol, seed and the result-changing keys
    that differ from the defaults (lists and tables as text, as add_hparams takes only scalars and strings)."""
    shown = {k: config.get(k) for k in (*GROUP_KEYS, "seed")}
    defaults = identity_values({})
    shown.update({k: v for k, v in identity_values(config).items() if v != defaults[k]})
    return {
        k: v if isinstance(v, int | float | str | bool) else json.dumps(v, sort_keys=True) for k, v in shown.items()
    }


def add_hparams(writer: Any, hparams: dict[str, Any], summary: dict[str, Any]) -> None:
    """The run's hparams with its final metrics (``hparam/<key>``), in ``<tensorboard>/hparams``."""
    metrics = {f"hparam/{k}": float(summary[k]) for k in SUMMARY_KEYS if _is_scalar(summary.get(k))}
    if hparams and metrics:
        writer.add_hparams(hparams, metrics, run_name="hparams")
