"""The method registry: ``@register_method(name)`` makes a ``Method`` subclass runnable as ``method: name``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from experiment.config import Config, ConfigError

if TYPE_CHECKING:
    from methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register the method under ``name`` (a duplicate name is an error)."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: Config, net: nn.Module, device: torch.device) -> Method:
    """The configured method around ``net``."""
    return method_class(cfg.method)(cfg, net, device)
