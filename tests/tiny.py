"""Shared test settings: the two-task digits command line and a config of every key's default."""

import incremental_train_and_eval  # noqa: F401  (declares every key, `seed` included)
from experiment import config

# A digits run in two tasks (classes 0-7, then 8-9), one epoch, two synthesis iterations: seconds on a CPU.
TWO_TASKS = [
    "--epochs=1",
    "--batch_size=64",
    "--nb_cl_fg=8",
    "--nb_cl=2",
    "--device=cpu",
    "--progress=false",
    "--memory_size=60",
    "--nb_generation=1",
    "--syn_batch_size=8",
    "--syn_iterations=2",
    "--syn_warmup=1",
]


def default_cfg(**overrides) -> config.Config:
    """Every key at its default, ``overrides`` on top, coerced but not validated (for the data layer)."""
    values = {**config.defaults(), **overrides}
    return config.Config({k: config.coerce(config.OPTIONS[k], v) for k, v in values.items()})
