"""Command line of the class-incremental learning framework.

    python main.py --config configs/digits/ccsi.yaml [--key=value ...]   # one run (all tasks)
    python main.py --config configs/bloodmnist/ccsi.yaml --task=2 --saved_model_address=runs/.../task_1.pt
    python main.py demo                      # the digits demo: several methods, one results table
    python main.py keys                      # every configuration key with its default and meaning

Overrides are ``--key=value`` (as a wandb agent passes sweep parameters) or ``--key value``.
Errors in the configuration, the data or a checkpoint print one line and exit with code 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

import config
from errors import UserError

DEMO_CONFIGS = ("configs/digits/finetune.yaml", "configs/digits/joint.yaml", "configs/digits/ccsi.yaml")
ROOT = Path(__file__).resolve().parent


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config FILE`` / ``--config=FILE`` (repeatable) from the key overrides."""
    files, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise config.ConfigError("--config needs a file: --config configs/digits/ccsi.yaml")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return files, rest


def run_from_args(argv: Sequence[str]) -> dict:
    import incremental_train_and_eval as engine  # declares every key (engine, data, models, methods)

    files, rest = split_config_args(argv)
    cfg = config.load_config(files, config.parse_overrides(rest))
    return engine.run(cfg)


def demo(argv: Sequence[str]) -> list[dict]:
    """Run the digits demo configs one after another and return their summaries."""
    from metrics import format_results_table

    results = []
    for path in DEMO_CONFIGS:
        if not (ROOT / path).is_file():
            continue
        method = Path(path).stem
        print(f"\n=== demo: {method} on digits ({path}) ===", flush=True)
        results.append(
            run_from_args(["--config", str(ROOT / path), f"--output_dir=runs/demo/{method}", "--overwrite=true", *argv])
        )
    print("\n" + format_results_table(results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        with logging_redirect_tqdm():
            if argv and argv[0] == "demo":
                demo(argv[1:])
            elif argv and argv[0] == "keys":
                import incremental_train_and_eval  # noqa: F401  (declares every key)

                print(config.reference_table())
            elif argv and argv[0] == "sweep":
                from sweep import main as sweep_main

                return sweep_main(argv[1:])
            elif not argv or argv[0] in ("-h", "--help"):
                print(__doc__)
            else:
                from metrics import format_results_table

                print("\n" + format_results_table([run_from_args(argv)]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: tasks already finished are saved; rerun with --resume=true to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
