"""The continual-learning methods, one module each, registered with ``@register_method`` (methods/registry.py).

Importing this package imports every method module (explicitly, no directory scan), declares the ``method`` key
with the registered names as its choices, and turns each method's ``defaults`` and ``requires`` into presets of
the ``method`` key (see ``config.register_preset``).
"""

from __future__ import annotations

from experiment.config import Option, register_options, register_preset
from methods import (  # noqa: F401  (each module registers its method)
    abd,
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
    pass_,
    rdfcil,
    rehearsal_kd,
    wa,
)
from methods.registry import METHODS, build_method, method_class, register_method

__all__ = ["METHODS", "build_method", "method_class", "register_method"]

register_options(
    "run",
    [Option("method", "str", "finetune", "continual-learning method to run", choices=tuple(sorted(METHODS)))],
)
for _name, _cls in sorted(METHODS.items()):
    _soft = {key: value for key, value in _cls.defaults.items() if key not in _cls.requires}
    if _soft:
        register_preset("method", _name, _soft, announce=True)
    if _cls.requires:
        register_preset("method", _name, _cls.requires, required=True, announce=True)
