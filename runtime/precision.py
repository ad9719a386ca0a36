"""How the network runs: numeric precision (``torch.autocast``) and compilation (``torch.compile``).

``precision: fp32`` (default) runs the code as written: nothing is wrapped, results are bit-identical to a
run without this module. ``bf16`` and ``fp16`` run convolutions and matrix products under autocast in that
dtype; the network's outputs are cast back to float32 (a forward hook), so loss terms are computed in
float32, and the synthesis moment statistics are computed in float32 (synthesis_losses.group_moments).
``fp16`` also scales the loss (``torch.amp.GradScaler``) so that small gradients do not flush to zero.
``compile: true`` compiles the network in place (``nn.Module.compile``: same module, same state_dict keys;
a deep copy such as a teacher is not compiled) and the synthesis step; on CUDA with mode "reduce-overhead"
(CUDA graphs), which removes the kernel-launch cost of the small fixed-shape steps. ``compile: graphs`` instead
captures whole steps (``capture_step``: forward, backward and optimiser step of training; a synthesis iteration)
with static shapes and tensor lrs, on CUDA only (elsewhere the same code runs eagerly). ``precision`` changes
results (scope "experiment"); ``compile`` runs the same operations fused, so results differ by float
rounding only (scope "run", like ``device``).

Measured on the project's 2-core AMD EPYC (AVX2; no AVX-512, no native bf16; 1 thread): bf16 and fp16
autocast make a training step about 14x slower, and compiling costs minutes for a per-step gain of 1.05x
(training) to 1.3x (synthesis); fp32 without compile is the fastest there.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from experiment.config import Config, ConfigError, Option, register_options

log = logging.getLogger(__name__)

register_options(
    "precision",
    [
        Option(
            "precision",
            "str",
            "fp32",
            "arithmetic of the network's forward and backward: fp32, or bf16 / fp16 autocast (loss terms and "
            "moment statistics stay float32; fp16 scales the loss); fp32 is bit-identical to no autocast",
            choices=("fp32", "bf16", "fp16"),
            scope="experiment",
        ),
        Option(
            "compile",
            "str",
            "false",
            "torch.compile: true = the network (training, evaluation) and the synthesis loss; graphs = the whole "
            "training step and synthesis iteration with static shapes (an epoch's ragged last batch padded with "
            "masked rows), tensor lrs and a capturable synthesis Adam, captured as CUDA graphs on CUDA (mode "
            "reduce-overhead) and run eagerly elsewhere. Compiling costs time per shape (minutes on a small CPU)",
            choices=("false", "true", "graphs"),
            scope="run",
        ),
    ],
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BACKEND = "inductor"  # torch.compile backend; tests use "eager" (tracing only, no code generation)


def autocast_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a matrix product under ``torch.autocast`` on ``device`` really runs in ``dtype``."""
    if (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return False
    try:
        a = torch.ones(2, 2, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns, and disables autocast, for a dtype it cannot run
            with torch.autocast(device.type, dtype=dtype):
                out = a @ a
    except (RuntimeError, ValueError):
        return False
    return out.dtype == dtype


def check(cfg: Config, device: torch.device) -> None:
    """Refuse, in one line, a precision that autocast cannot run on ``device``, and ``compile: graphs`` under
    torchrun (a captured step holds no gradient all-reduce)."""
    if cfg.compile == "graphs" and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("key 'compile': graphs captures one process's training step; under torchrun use compile true")
    if cfg.precision != "fp32" and not autocast_supported(device, DTYPES[cfg.precision]):
        raise ConfigError(
            f"key 'precision': {cfg.precision} autocast is not supported on {device.type} "
            f"(torch {torch.__version__}); use precision fp32"
        )


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run forward passes (and losses) in: a no-op for fp32, else ``torch.autocast``."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.precision])


def grad_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (gradients of a scaled loss, unscaled before the step); None otherwise."""
    return torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None


def scale_loss(loss: Tensor, scaler: torch.amp.GradScaler | None) -> Tensor:
    """The loss to back-propagate: scaled when a scaler is given (fp16), else ``loss`` itself."""
    return loss if scaler is None else scaler.scale(loss)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``; with a scaler: unscale, skip the step if a gradient is not finite, adapt the scale."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def _outputs_to_float32(_module: nn.Module, _args: Any, output: Any) -> Any:
    """Forward hook: floating-point outputs (a tensor or a dict of tensors) as float32."""
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in output.items()}
    return output


def compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile arguments: CUDA graphs on CUDA (small steps are launch-bound there), the default elsewhere."""
    if BACKEND != "inductor":
        return {"backend": BACKEND}
    return {"mode": "reduce-overhead" if device.type == "cuda" else "default"}


def prepare_model(net: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Check the precision, make low-precision outputs float32 and compile ``net`` in place if asked; returns it.

    With ``precision: fp32`` and ``compile: false`` nothing is changed.
    """
    check(cfg, device)
    if cfg.precision != "fp32":
        net.register_forward_hook(_outputs_to_float32)  # kept by deep copies (teachers) too
    if cfg.compile == "true":
        net.compile(**compile_options(device))
    return net


_COMPILED: dict[tuple[Callable, str], Callable] = {}


def compile_function(fn: Callable, cfg: Config, device: torch.device) -> Callable:
    """``fn`` compiled with torch.compile under ``compile: true`` (one compiled wrapper per function), else ``fn``."""
    if cfg.compile != "true":
        return fn
    return _compiled(fn, compile_options(device))


def capture_step(fn: Callable, cfg: Config, device: torch.device) -> Callable:
    """A whole step (forward, backward, optimiser step) under ``compile: graphs``: on CUDA ``fn`` compiled with mode
    "reduce-overhead" (its graphs replayed as CUDA graphs); elsewhere ``fn`` itself, run eagerly (tests trace it
    on the CPU with the "eager" backend)."""
    if cfg.compile != "graphs" or (device.type != "cuda" and BACKEND == "inductor"):
        return fn
    compiled = torch.compile(fn, **compile_options(device))
    if device.type != "cuda":
        return compiled

    def step(*args: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: their memory may be reused
        return compiled(*args)

    return step


def _compiled(fn: Callable, options: dict[str, Any]) -> Callable:
    key = (fn, repr(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]
