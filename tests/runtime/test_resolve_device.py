"""device: auto warns once when the machine has an NVIDIA GPU that torch cannot use (environment faked)."""

import logging
import shutil

import pytest
import torch

from runtime import distributed


@pytest.fixture
def no_nvidia(monkeypatch, tmp_path):
    """A machine with no driver files and no nvidia-smi; returns the path that stands for the driver file."""
    marker = tmp_path / "nvidia_version"
    monkeypatch.setattr(distributed, "NVIDIA_MARKERS", (str(marker),))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    return marker


def test_nvidia_gpu_present_from_driver_file_or_nvidia_smi(no_nvidia, monkeypatch):
    assert not distributed.nvidia_gpu_present()
    no_nvidia.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01\n")
    assert distributed.nvidia_gpu_present()
    no_nvidia.unlink()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert distributed.nvidia_gpu_present()


@pytest.mark.parametrize(("gpu_present", "name", "warnings"), [(True, "auto", 1), (False, "auto", 0), (True, "cpu", 0)])
def test_auto_on_cpu_warns_about_an_unusable_gpu(monkeypatch, caplog, gpu_present, name, warnings):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "nvidia_gpu_present", lambda: gpu_present)
    with caplog.at_level(logging.WARNING, logger="distributed"):
        assert distributed.resolve_device(name) == torch.device("cpu")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == warnings
    if warnings:
        assert "NVIDIA GPU that torch" in lines[0] and "update the driver" in lines[0] and "\n" not in lines[0]


def test_no_warning_when_torch_uses_the_gpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "nvidia_gpu_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="distributed"):
        assert distributed.resolve_device("auto") == torch.device("cuda")
    assert not caplog.records
