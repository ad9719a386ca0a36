"""How much of a finished run's last accuracy is lost to recency bias: the final model's logits on the test split
with the last task's logits lowered by delta. A diagnostic that reads the test split, never a model selection.

For each run folder, one row per delta: accuracy on all seen classes, on the old classes (before the last task) and on
the last task's, and the share of old-class test images predicted as a last-task class. The last row, delta = inf,
is the old classes' accuracy among old classes alone: the ceiling that removing the bias could reach, below which the
features themselves have forgotten.

Example:
    .venv/bin/python bench/recency_bias.py runs/ablation_mnist10k/improved/seed0 runs/ablation_mnist10k/improved/seed2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import incremental_train_and_eval as engine
from dataloaders.image_set import as_float
from experiment import config
from experiment.checkpoint import TaskCheckpoint, completed_tasks, task_checkpoint_path
from experiment.errors import UserError

DELTAS = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)


def final_logits(folder: Path, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The last checkpoint's logits (N, C) on the run's test split, the labels (N,) and the number of old classes."""
    done = completed_tasks(folder) if (folder / "config.yaml").is_file() else []
    if not done:
        raise UserError(f"{folder} holds no finished task (config.yaml and task_<t>.pt); give a run folder")
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    ignored = set(config.unused_keys(saved["method"], saved))  # other methods' keys: they change nothing here
    cfg = config.load_config(overrides={**{k: v for k, v in saved.items() if k not in ignored}, "progress": False})
    state = engine.build_run(cfg, torch.device("cpu"))
    path = task_checkpoint_path(folder, done[-1])
    engine.restore(state, TaskCheckpoint.load(path), path)
    state.method.eval()
    n_seen = state.scenario.n_seen(done[-1])
    test = state.splits.test.of_classes(list(range(n_seen)))
    with torch.no_grad():
        parts = [state.method.predict(as_float(test.x[i : i + batch_size])) for i in range(0, len(test), batch_size)]
    return torch.cat(parts), test.y, state.scenario.n_old(done[-1])


def bias_rows(logits: torch.Tensor, y: torch.Tensor, n_old: int, deltas=DELTAS) -> list[dict[str, float]]:
    """For each delta: accuracy (%) on all, old and new classes and old images taken as new (%), with the new
    classes' logits lowered by delta (inf: the new columns left out for every image)."""
    old = y < n_old  # (N,)
    rows = []
    for delta in deltas:
        adjusted = logits.clone()
        adjusted[:, n_old:] = -math.inf if math.isinf(delta) else adjusted[:, n_old:] - delta
        right = adjusted.argmax(1) == y  # (N,)
        rows.append(
            {
                "delta": delta,
                "all": 100.0 * right.float().mean().item(),
                "old": 100.0 * right[old].float().mean().item(),
                "new": 100.0 * right[~old].float().mean().item(),
                "old_as_new": 100.0 * (adjusted[old].argmax(1) >= n_old).float().mean().item(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| run | delta | all | old | new | old→new % |", "|---|---:|---:|---:|---:|---:|"]
    try:
        for folder in args.folders:
            for row in bias_rows(*final_logits(folder)):
                cells = [str(folder), f"{row['delta']:g}"] + [f"{row[k]:.2f}" for k in ("all", "old", "new")]
                lines.append("| " + " | ".join([*cells, f"{row['old_as_new']:.2f}"]) + " |")
    except (UserError, config.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
