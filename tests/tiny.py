"""Shared test helpers: the two-task digits command line, a config of every key's default, tiny synthesis
teachers and data, and fake data files in the real on-disk formats."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import incremental_train_and_eval as engine  # declares every key, `seed` included
from dataloaders.image_set import ImageSet
from experiment import config
from methods.ccsi import synthesize_classes
from methods.class_statistics import ClassMemory

ROOT = Path(__file__).resolve().parents[1]  # the repository

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


# Settings of the small synthesis runs below: short, with a short warm-up so that the lr is not tiny.
SMALL = dict(nb_generation=2, syn_batch_size=8, syn_iterations=20, syn_warmup=5, syn_log_every=5)


class TinyCN(nn.Module):
    """Conv - CN(GN + BN) - ReLU - conv - CN - ReLU - pool - linear; returns dict(logits) (or a tensor)."""

    def __init__(self, channels: int = 1, classes: int = 3, cn: bool = True, as_dict: bool = True):
        super().__init__()
        self.as_dict = as_dict
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, 8, affine=False) if cn else nn.Identity()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, 8, affine=False) if cn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.gn1(self.conv1(x))))
        h = F.relu(self.bn2(self.gn2(self.conv2(h))))
        logits = self.fc(h.mean(dim=(2, 3)))
        return {"logits": logits} if self.as_dict else logits


def method_at_task_2(cfg: config.Config):
    """The run's method at the start of task 2 (task 1 untrained: only its end-of-task step) and task 2's context."""
    state = engine.build_run(cfg, torch.device("cpu"))
    for task in (1, 2):
        task_cfg = cfg.for_task(task)
        ctx = engine.task_context(state, task, task_cfg, engine.seed_everything(task))
        state.method.begin_task(ctx, task_cfg)
        if task == 1:
            state.method.end_task(ctx)  # no training: memory, statistics, Fisher of the initial net
    return state.method, ctx


def tiny_teacher(seed: int = 0, **kwargs) -> TinyCN:
    """A TinyCN with random weights whose running statistics come from a few random batches."""
    torch.manual_seed(seed)
    net = TinyCN(**kwargs)
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, net.conv1.in_channels, 8, 8))
    return net.eval()


def random_images(n: int, classes: int, channels: int = 1, size: int = 8, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    y = torch.arange(n) % classes
    return ImageSet(x, y)


def synth(net: nn.Module, memory: ClassMemory, n_classes: int, cfg: config.Config, seed: int, **kwargs):
    """Impressions of classes 0..n_classes-1 from the class memory (methods.ccsi.synthesize_classes)."""
    shape = tuple(memory.mean_images.shape[1:])
    return synthesize_classes(net, n_classes, shape, cfg, seed, "cpu", memory, **kwargs)


def tiny_memory(net: nn.Module, classes: int = 3) -> ClassMemory:
    memory = ClassMemory()
    memory.add_task(net, random_images(30, classes), batch_size=7, device="cpu")
    return memory


def write_fake_medmnist(path: Path, n_classes: int, channels: int, per_class: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", per_class), ("val", 2), ("test", 3)):
        labels = np.repeat(np.arange(n_classes), n)[:, None].astype(np.uint8)  # (N, 1) as MedMNIST
        shape = (len(labels), 28, 28) if channels == 1 else (len(labels), 28, 28, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)


def write_digits(path, classes: int, n_train: int) -> str:
    """A MedMNIST-format .npz of digits 0..classes-1: n_train training, 16 val, 100 test images (32x32 grey)."""
    from dataloaders.digits import digits_images

    x, y = digits_images()
    keep = (y < classes).nonzero().squeeze(1)
    x, y = x[keep, 0].numpy(), y[keep].numpy()
    splits = {
        "train": slice(0, n_train),
        "val": slice(n_train, n_train + 16),
        "test": slice(n_train + 16, n_train + 116),
    }
    np.savez(path, **{f"{k}_{a}": v[s] for k, s in splits.items() for a, v in (("images", x), ("labels", y))})
    return str(path)
