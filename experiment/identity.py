"""A run's identity: which keys change its results, its hash, and what may differ when a run is continued.

Every key has a scope (``config.SCOPES``): "run" keys say how to run (folders, device, logging, batch size of
evaluation) and never enter the identity; "experiment" keys are fixed for a whole run; "task" keys are per-task
hyper-parameters. One rule decides what may change when a run goes on:
- resuming a run (``--resume=true``, from a finished task or from a task in progress) needs every experiment and
  task key to agree (``check_same_run``);
- continuing another run's checkpoint (``saved_model_address``) needs the experiment keys to agree; differing task
  keys are listed on the console (``check_same_experiment``; the per-task sweeps tune them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from experiment.config import OPTIONS, Config
from experiment.errors import CheckpointError

log = logging.getLogger(__name__)

RESUME_SCOPES = ("experiment", "task")  # what must agree to resume a run
CONTINUE_SCOPES = ("experiment",)  # what must agree to continue another run's checkpoint


def identity_values(values: dict[str, Any]) -> dict[str, Any]:
    """What a run computes: the value of every key whose scope is not "run" (a key missing from ``values``, e.g.
    in an older checkpoint, takes its default), and the ``per_task`` table."""
    out = {name: values.get(name, opt.default) for name, opt in sorted(OPTIONS.items()) if opt.scope != "run"}
    out["per_task"] = {str(t): dict(sorted(v.items())) for t, v in sorted((values.get("per_task") or {}).items())}
    return out


def config_hash(values: dict[str, Any], **context: Any) -> str:
    """8 hex digits identifying a run: sha256 of its identity values (``Config.to_dict()``) and ``context``
    (for example the task a per-task run trains and the identity of the checkpoint it continues from)."""
    text = json.dumps({"config": identity_values(values), **context}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_hash(cfg: Config, parent_hash: str | None) -> str:
    """The run's identity: its result-changing keys, the task it trains and the run it continues from."""
    return config_hash(cfg.to_dict(), task=cfg.task, parent=parent_hash)


def differences(saved: dict[str, Any], current: dict[str, Any], scopes: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """Keys of the given scopes whose values differ between two ``Config.to_dict()``: name -> (saved, current).
    With scope "task", differing ``per_task`` tables count as one key ``per_task``."""
    a, b = identity_values(saved), identity_values(current)
    out = {
        name: (a[name], b[name]) for name, opt in OPTIONS.items() if opt.scope in scopes and a.get(name) != b.get(name)
    }
    if "task" in scopes and a["per_task"] != b["per_task"]:
        out["per_task"] = (a["per_task"], b["per_task"])
    return dict(sorted(out.items()))


def describe_differences(diffs: dict[str, tuple[Any, Any]], before: str, now: str) -> str:
    """'lr (0.1 before, 0.05 now), epochs (...)' for messages."""
    return ", ".join(f"{name} ({a!r} {before}, {b!r} {now})" for name, (a, b) in diffs.items())


def check_same_run(saved: dict[str, Any], cfg: Config, source: str) -> None:
    """Refuse to resume ``source`` (a task checkpoint or a task in progress) with another value of a key that
    changes results; keys of scope "run" (device, folders, evaluation batch size, data_root) may differ."""
    diffs = differences(saved, cfg.to_dict(), RESUME_SCOPES)
    if diffs:
        raise CheckpointError(
            f"{source} was trained with other values of {describe_differences(diffs, 'there', 'now')}; resume with "
            "the run's values, or continue its checkpoint into another folder with --task and --saved_model_address"
        )


def check_same_experiment(saved: dict[str, Any], cfg: Config, source: str) -> None:
    """Refuse to continue another run's checkpoint ``source`` with other experiment keys; list the task keys that
    differ (the per-task sweeps tune them)."""
    diffs = differences(saved, cfg.to_dict(), CONTINUE_SCOPES)
    if diffs:
        raise CheckpointError(
            f"{source} was trained with other values of {describe_differences(diffs, 'there', 'now')}; use the "
            "values that trained it"
        )
    tuned = differences(saved, cfg.to_dict(), ("task",))
    if tuned:
        log.info("continuing %s with other per-task values: %s", source, describe_differences(tuned, "there", "now"))
