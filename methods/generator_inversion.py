"""Generator-based model inversion shared by ABD (Smith et al., ICCV 2021) and R-DFCIL (Gao et al., ECCV 2022).

A small convolutional generator maps N(0, I) codes to images; it is trained against the frozen previous model
(the teacher) so that its images are classified confidently (CE at temperature ``gen_content_temperature`` on the
teacher's own argmax), cover every old class equally (the class-balance entropy term), match the mean and
variance that every normalisation layer of the teacher (BatchNorm, or CN's BatchNorm behind its GroupNorm) saw on
real data (a Gaussian KL per channel, ``gen_feature_weight``), and are locally smooth (``gen_prior_weight`` times
the MSE to a Gaussian-blurred copy). Both public codes (GT-RIPL/AlwaysBeDreaming-DFCIL ``datafree_helper.py``,
and cl_lite's ``GenerativeInversion`` used by jianzhangcs/R-DFCIL) use these terms with the same defaults.
No real image is read: only the teacher's weights and running statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloaders.batches import BatchShard
from experiment.config import Config, Option, register_options
from synthesis_losses import bn_layers, capture_bn_inputs, eval_mode

register_options(
    "generator_inversion",
    [
        Option(
            "gen_iterations", "int", 5000, "generator training steps per task (ABD CIFAR: 10000, R-DFCIL: 5000)", min=0
        ),
        Option("gen_lr", "float", 1e-3, "Adam learning rate of the generator (both codes: 1e-3)", min=0.0),
        Option("gen_batch_size", "int", 128, "images per generator training step (both codes: the batch size)", min=2),
        Option("gen_z_dim", "int", 1000, "size of the generator's input code (both codes: 1000)", min=1),
        Option("gen_width", "int", 128, "channels of the generator's first convolutions (both codes: 128)", min=2),
        Option("gen_feature_weight", "float", 50.0, "weight of the normalisation-statistics KL (both: 50)", min=0.0),
        Option("gen_prior_weight", "float", 1e-3, "weight of the smoothness prior (both codes: 1e-3)", min=0.0),
        Option(
            "gen_content_temperature",
            "float",
            1000.0,
            "temperature of the content CE (both: 1000)",
            min=0.0,
            min_exclusive=True,
        ),
        Option("gen_content_weight", "float", 1.0, "weight of the content CE (both codes: 1)", min=0.0),
        Option("gen_balance_weight", "float", 1.0, "weight of the class-balance entropy term (both codes: 1)", min=0.0),
    ],
    scope="task",
)

__all__ = [
    "Generator",
    "InversionGenerator",
    "class_balance_entropy",
    "draw_normal_rows",
    "feature_statistics_kl",
    "smoothness_prior",
]


# ----- the inversion losses ---------------------------------------------------------------------------------


def feature_statistics_kl(activation: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """Mean over channels of KL(N(mu_r, var_r) || N(mu, var)) between a layer's stored statistics and those of the
    activation (B, C, H, W): 0.5 * (log(var / var_r) + (var_r + (mu_r - mu)^2) / var - 1), var biased (+1e-8)."""
    if activation.dim() != 4 or running_mean.shape != (activation.shape[1],):
        raise ValueError(
            f"feature_statistics_kl: expected (B, C, H, W) and (C,), got {tuple(activation.shape)} "
            f"and {tuple(running_mean.shape)}"
        )
    mean = activation.mean(dim=(0, 2, 3))  # (C,)
    var = activation.transpose(0, 1).flatten(1).var(dim=1, unbiased=False) + 1e-8  # (C,)
    r_mean, r_var = running_mean.to(var.dtype), running_var.to(var.dtype)
    return 0.5 * (torch.log(var / (r_var + 1e-8)) + (r_var + (r_mean - mean) ** 2 + 1e-8) / var - 1).mean()


def class_balance_entropy(logits: Tensor) -> Tensor:
    """1 - H(p_bar) / log K for p_bar the batch mean of softmax(logits) (B, K): 0 when every class is equally
    likely over the batch, 1 when one class takes all (both codes' "class balance" / "label diversity" term)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"class_balance_entropy: expected (B, K) with K >= 2, got {tuple(logits.shape)}")
    p_bar = F.softmax(logits, dim=1).mean(dim=0)  # (K,)
    return 1.0 + (p_bar * torch.log(p_bar)).sum() / math.log(logits.shape[1])


def gaussian_kernel(size: int = 5, sigma: float = 1.0) -> Tensor:
    """The codes' 2-D smoothing kernel (size, size), summing to 1: exp(-((d - c) / (2 sigma))^2) per axis (their
    formula; a textbook Gaussian has 2 sigma^2 in the denominator, i.e. this one is a Gaussian of std sqrt(2) sigma)."""
    d = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((d / (2 * sigma)) ** 2))  # (size,)
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def smoothness_prior(x: Tensor) -> Tensor:
    """MSE between images (B, C, H, W) and their blur by ``gaussian_kernel(5, 1)`` after reflect padding by 2."""
    channels = x.shape[1]
    kernel = gaussian_kernel().to(x).expand(channels, 1, 5, 5)
    smooth = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=channels)
    return F.mse_loss(x, smooth)


# ----- the generator ----------------------------------------------------------------------------------------


class Generator(nn.Module):
    """Code (B, z_dim) -> images (B, C, H, W) in [0, 1]: linear to width x H/4 x W/4, BN, 2x up, conv-BN-LReLU,
    2x up, conv-BN-LReLU (width / 2), conv to C channels, sigmoid (the codes' CIFAR generator, with a sigmoid in
    place of its tanh + affine-free BN: our networks take [0, 1] images)."""

    def __init__(self, z_dim: int, image_shape: tuple[int, ...], width: int = 128):
        super().__init__()
        channels, height, wide = image_shape
        self.z_dim, self.image_shape = z_dim, tuple(image_shape)
        self.init_size = (max(1, math.ceil(height / 4)), max(1, math.ceil(wide / 4)))
        self.width = width
        self.fc = nn.Linear(z_dim, width * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2))
        half = max(1, width // 2)
        self.conv2 = nn.Sequential(nn.Conv2d(width, half, 3, padding=1), nn.BatchNorm2d(half, 0.8), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(half, channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.bn0(self.fc(z).view(z.shape[0], self.width, *self.init_size))  # (B, width, H/4, W/4)
        h = self.conv1(F.interpolate(h, scale_factor=2))
        h = self.conv2(F.interpolate(h, scale_factor=2))
        if tuple(h.shape[2:]) != self.image_shape[1:]:
            h = F.interpolate(h, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(h))  # (B, C, H, W)


def draw_normal_rows(shard: BatchShard, n: int, dim: int, generator: torch.Generator) -> Tensor:
    """N(0, 1) draws (n, dim) for this process's ``n`` rows, drawn for the global batch (as ``draw_rows``), on CPU."""
    if shard.whole:
        return torch.randn(n, dim, generator=generator)
    return torch.randn(shard.size, dim, generator=generator)[shard.rows]


class InversionGenerator:
    """A generator and its Adam optimiser, trained against a teacher by ``train``; a part (``state_dict``) when a
    method keeps it across tasks (ABD), or made fresh per task (R-DFCIL). Built on first use from the image shape."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.net: Generator | None = None
        self.opt: torch.optim.Adam | None = None

    def build(self, image_shape: tuple[int, ...], seed: int) -> None:
        """Create the generator (weights from ``seed``) and its optimiser, unless already built."""
        if self.net is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = Generator(self.cfg.gen_z_dim, image_shape, self.cfg.gen_width).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.gen_lr)

    def train(self, teacher: nn.Module, n_old: int, cfg: Config, generator: torch.Generator) -> dict[str, float]:
        """``cfg.gen_iterations`` Adam steps against the frozen ``teacher`` over its first ``n_old`` classes; the
        last step's loss terms."""
        if self.net is None or self.opt is None:
            raise ValueError("InversionGenerator.train: call build(image_shape, seed) first")
        for group in self.opt.param_groups:
            group["lr"] = cfg.gen_lr
        layers = bn_layers(teacher)
        terms: dict[str, Tensor] = {}
        self.net.train()
        with eval_mode(teacher), capture_bn_inputs(layers) as inputs:
            for _ in range(cfg.gen_iterations):
                z = torch.randn(cfg.gen_batch_size, self.net.z_dim, generator=generator).to(self.device)
                x = self.net(z)  # (B, C, H, W)
                logits = teacher(x)["logits"][:, :n_old]  # (B, n_old)
                content = F.cross_entropy(logits / cfg.gen_content_temperature, logits.detach().argmax(dim=1))
                balance = class_balance_entropy(logits) if n_old > 1 else logits.new_zeros(())
                stats = torch.stack(
                    [feature_statistics_kl(inputs[i], m.running_mean, m.running_var) for i, m in enumerate(layers)]
                ).mean()
                prior = smoothness_prior(x)
                loss = (
                    cfg.gen_content_weight * content
                    + cfg.gen_balance_weight * balance
                    + cfg.gen_feature_weight * stats
                    + cfg.gen_prior_weight * prior
                )
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                terms = {"content": content, "balance": balance, "statistics": stats, "prior": prior, "total": loss}
        self.net.eval()
        return {name: float(value.detach()) for name, value in terms.items()}

    @torch.no_grad()
    def sample(self, teacher: nn.Module, z: Tensor, n_old: int) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) from codes ``z`` (B, z_dim) (generator in eval mode) and the teacher's labels (B,)
        over its first ``n_old`` classes."""
        if self.net is None:
            raise ValueError("InversionGenerator.sample: the generator was never built")
        self.net.eval()
        x = self.net(z.to(self.device))
        with eval_mode(teacher):
            y = teacher(x)["logits"][:, :n_old].argmax(dim=1)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        if self.net is None or self.opt is None:
            return {}
        return {"image_shape": list(self.net.image_shape), "net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.net, self.opt = None, None
            return
        self.net = None
        self.build(tuple(state["image_shape"]), 0)
        assert self.net is not None and self.opt is not None
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
