"""Shared fixtures: small, fast configurations on the embedded digits data set.

Configurations are built with the engine's ``load_run_config``, the one loader of every entry point (main.py and
its commands, the sweep runner, bench scripts): tests see the key set the command line sees. What a fresh process
started each way sees is checked in a subprocess (tests/test_main.py, tests/experiment/test_config.py)."""

import os

import pytest
import torch

from incremental_train_and_eval import load_run_config

torch.set_num_threads(1)  # small models: one thread is as fast, and never oversubscribes
# Processes the tests start (main.py, torchrun, bench scripts) too: make test runs one worker per core (xdist), so a
# second thread per process would only oversubscribe. A test that measures threads sets its own.
os.environ["OMP_NUM_THREADS"] = "1"


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
        return load_run_config(overrides=values)

    return make
