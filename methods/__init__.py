"""Method registry. Each method is one module here, registered with ``@register_method(name)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from config import Config, ConfigError, Option, register_options
from methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def build_method(cfg: Config, net: nn.Module, device: torch.device) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method](cfg, net, device)


# Explicit imports (no directory scan): each module registers its method and its config keys.
from methods import (  # noqa: E402, F401
    ccsi,
    deepinversion,
    der,
    ewc,
    finetune,
    gdumb,
    icarl,
    joint,
    lucir,
    lwf,
    rehearsal_kd,
    wa,
)

register_options(
    "run",
    [Option("method", "str", "finetune", "continual-learning method to run", choices=tuple(sorted(METHODS)))],
)
