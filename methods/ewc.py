"""EWC: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), online form, class-incremental.

After each task the diagonal Fisher F at the trained parameters theta* is estimated from the task's training
images (eval mode, no augmentation) from squared gradients of log p(y | x), y the true label (empirical
Fisher) or the prediction: per sample through ``torch.func.vmap`` ("sample", the paper's definition) or per
batch ("batch", PyCIL's estimate, whose lambda = 1000 and clamp 1e-4 are our defaults). Fishers accumulate,
F <- ewc_gamma * F + F_t (online EWC, Schwarz et al. 2018; gamma = 1 sums them), with the latest theta* as
the one anchor. On task t >= 2: ``loss = CE(new-class logits, y - n_old) + ewc_lambda / 2 * sum F (theta -
theta*)^2`` over the backbone and the head rows (and bias/sigma) of the classes the anchor knew; head blocks
are joined into one (n_classes, ...) tensor per kind, so the head's growth does not matter. As in PyCIL's
``models/ewc.py``, the cross-entropy covers only the new classes' outputs from task 2 on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dataloaders.batches import Batch
from dataloaders.image_set import ImageSet, as_float
from experiment.config import Config, Option, register_options
from methods.base import Method, TaskContext
from methods.registry import register_method
from synthesis_losses import eval_mode

register_options(
    "ewc",
    [
        Option(
            "ewc_lambda",
            "float",
            1000.0,
            "penalty weight lambda in lambda/2 * sum F (theta - theta*)^2 (PyCIL models/ewc.py: lamda = 1000)",
            min=0.0,
        ),
        Option(
            "ewc_gamma",
            "float",
            1.0,
            "online EWC decay of the accumulated Fisher per task (Schwarz et al. 2018; 1 = sum of the tasks' Fishers)",
            min=0.0,
            max=1.0,
        ),
        Option(
            "ewc_fisher_target",
            "str",
            "label",
            "class whose log-likelihood gradient is squared: label = empirical Fisher (PyCIL), prediction = argmax",
            choices=("label", "prediction"),
        ),
        Option(
            "ewc_fisher_estimator",
            "str",
            "batch",
            "Fisher estimate: sample = mean of per-sample squared gradients (Kirkpatrick et al.); batch = mean of "
            "squared batch-mean gradients over batches of batch_size (PyCIL, whose lambda and clamp fit it)",
            choices=("sample", "batch"),
        ),
        Option(
            "ewc_fisher_max",
            "float",
            1e-4,
            "clamp each Fisher entry to at most this value (PyCIL models/ewc.py: fishermax = 1e-4); null: no clamp",
            min=0.0,
            min_exclusive=True,
            nullable=True,
        ),
    ],
    scope="task",
)

# Floats of per-sample gradients held at once while estimating the Fisher (about 256 MB in float32).
FISHER_GRADIENT_BUDGET = 2**26


def canonical_parameters(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Name -> tensor with the head's blocks joined: ``head.weight`` (n, D), ``head.bias`` (n,), ``head.sigma``.

    Backbone tensors keep their names. Head tensors named ``head.<path>.<kind>`` are concatenated along dim 0
    per kind, in sorted path order (the old block ``fc1`` before the new ``fc2``), so rows are class positions.
    """
    out: dict[str, Tensor] = {}
    head: dict[str, list[tuple[str, Tensor]]] = {}
    for name, tensor in named:
        if name.startswith("head."):
            path, kind = name.rsplit(".", 1)
            head.setdefault(kind, []).append((path, tensor))
        else:
            out[name] = tensor
    for kind, parts in sorted(head.items()):
        parts.sort(key=lambda item: item[0])
        tensors = [t for _, t in parts]
        out[f"head.{kind}"] = tensors[0] if tensors[0].dim() == 0 else torch.cat(tensors)
    return out


def ewc_penalty(current: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> Tensor:
    """sum_n sum F_n * (theta_n[:k] - theta*_n)^2 over the anchored tensors (k = the anchor's rows); no 1/2.

    A tensor that has gained rows since the anchor (a grown head) is compared on its first k rows;
    one whose other dimensions changed raises ValueError.
    """
    total = None
    for name, theta_star in anchor.items():
        theta = current[name]
        if theta.shape[1:] != theta_star.shape[1:] or (theta.dim() > 0 and theta.shape[0] < theta_star.shape[0]):
            raise ValueError(f"EWC: {name} has shape {tuple(theta.shape)}, the anchor {tuple(theta_star.shape)}")
        if theta.dim() > 0:
            theta = theta[: theta_star.shape[0]]
        term = (fisher[name] * (theta - theta_star).square()).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("EWC: the anchor holds no parameter")
    return total


def fisher_diagonal(
    net: nn.Module, images: ImageSet, target: str, estimator: str, batch_size: int, device: torch.device
) -> dict[str, Tensor]:
    """Diagonal Fisher of every trainable parameter, by name, from ``images`` with ``net`` in eval mode.

    estimator "sample": mean_i g_i^2 with g_i = d log p(y_i | x_i) / d theta (per-sample gradients by vmap,
    in chunks of at most ``batch_size``); "batch": mean over batches of ``batch_size`` of (d mean_i log p / d
    theta)^2, PyCIL's estimate, about 1/batch_size of the former near a minimum. ``target``: the "label" of each
    image or the model's "prediction". ``net`` returns dict(logits=(B, C)).
    """
    if len(images) == 0:
        raise ValueError("fisher_diagonal: no image to estimate the Fisher from")
    if estimator not in ("sample", "batch") or target not in ("label", "prediction"):
        raise ValueError(f"fisher_diagonal: unknown estimator {estimator!r} or target {target!r}")
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in net.named_buffers()}
    n_params = sum(p.numel() for p in params.values())
    chunk = batch_size
    if estimator == "sample":
        chunk = max(1, min(batch_size, FISHER_GRADIENT_BUDGET // max(n_params, 1)))

    def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(net, (p, buffers), (x.unsqueeze(0),))["logits"]  # (1, C)
        return F.log_softmax(logits, dim=1)[0].gather(0, y.view(1))[0]

    per_sample_grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    with eval_mode(net):
        for start in range(0, len(images), chunk):
            x = as_float(images.x[start : start + chunk]).to(device)  # (b, C, H, W)
            y = images.y[start : start + chunk].to(device)  # (b,)
            if target == "prediction":
                with torch.no_grad():
                    y = net(x)["logits"].argmax(dim=1)
            if estimator == "sample":
                grads = per_sample_grads({n: p.detach() for n, p in params.items()}, x, y)  # name -> (b, *shape)
                for n, g in grads.items():
                    sums[n] += g.square().sum(dim=0)
            else:
                log_p = F.log_softmax(net(x)["logits"], dim=1).gather(1, y.view(-1, 1)).mean()
                for n, g in zip(params, torch.autograd.grad(log_p, list(params.values()))):
                    sums[n] += g.square()
            batches += 1
    count = len(images) if estimator == "sample" else batches
    return {n: s / count for n, s in sums.items()}


@register_method("ewc")
class EWC(Method):
    """Quadratic penalty that keeps parameters important to earlier tasks near their trained values."""

    defaults: ClassVar[dict[str, Any]] = {"head": "linear"}  # PyCIL's linear classifier

    def __init__(self, cfg: Config, net: nn.Module, device: torch.device):
        super().__init__(cfg, net, device)
        self.fisher: dict[str, Tensor] | None = None  # canonical name -> accumulated Fisher
        self.anchor: dict[str, Tensor] | None = None  # canonical name -> theta* after the last task

    def penalty(self) -> Tensor:
        """sum F (theta - theta*)^2 of the current parameters (no lambda/2); 0 before the first anchor."""
        if self.anchor is None or self.fisher is None:
            return torch.zeros((), device=self.device)
        return ewc_penalty(canonical_parameters(self.net.named_parameters()), self.anchor, self.fisher)

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        if self.anchor is None:
            return super().training_step(batch)
        logits = self.net(batch.x)["logits"]  # (B, n_seen)
        ce = F.cross_entropy(logits[:, self.n_old :], batch.y - self.n_old)
        ewc = self.penalty()
        return {"loss": ce + self.cfg.ewc_lambda / 2 * ewc, "ce": ce, "ewc": ewc}

    def after_task(self, ctx: TaskContext) -> None:
        """Fisher of this task at the trained parameters, merged into the running Fisher; new anchor."""
        cfg = self.cfg
        task_fisher = canonical_parameters(
            fisher_diagonal(
                self.net, ctx.train, cfg.ewc_fisher_target, cfg.ewc_fisher_estimator, cfg.batch_size, self.device
            ).items()
        )
        if self.fisher is not None:  # online EWC: F <- gamma * F + F_t, on the rows the old Fisher has
            for name, old in self.fisher.items():
                grown = task_fisher[name]
                (grown[: old.shape[0]] if old.dim() > 0 else grown).add_(cfg.ewc_gamma * old)
        if cfg.ewc_fisher_max is not None:
            task_fisher = {n: f.clamp(max=cfg.ewc_fisher_max) for n, f in task_fisher.items()}
        self.fisher = task_fisher
        trainable = ((n, p) for n, p in self.net.named_parameters() if p.requires_grad)
        self.anchor = {n: p.detach().clone() for n, p in canonical_parameters(trainable).items()}

    # ----- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        to = self.device
        self.fisher = None if state["fisher"] is None else {n: t.to(to) for n, t in state["fisher"].items()}
        self.anchor = None if state["anchor"] is None else {n: t.to(to) for n, t in state["anchor"].items()}
