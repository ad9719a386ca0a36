"""Shared fixtures: small, fast configurations on the embedded digits data set."""

import pytest
import torch

import incremental_train_and_eval  # noqa: F401  (declares every key)
from experiment import config

torch.set_num_threads(1)  # small models: one thread is as fast, and never oversubscribes


@pytest.fixture
def make_cfg(tmp_path):
    """Build a validated config for a tiny digits run in tmp_path; keyword arguments override keys."""

    def make(**overrides):
        values = {
            "dataset": "digits",
            "epochs": 2,
            "batch_size": 32,
            "lr": 0.05,
            "device": "cpu",
            "progress": False,
            "select_on": "last",
            "output_dir": str(tmp_path / "run"),
        }
        values.update(overrides)
        return config.load_config(overrides=values)

    return make
