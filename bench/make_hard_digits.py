"""A harder offline data set: scikit-learn's digits at 28x28 with random affine distortions, blur, contrast and noise.

Deterministic for a given --seed. Each of the 1797 8x8 digits gives --copies distorted 28x28 images (bilinear
upscaling, then per image: rotation, anisotropic scale, shear, translation, stroke thickening or thinning, blur,
contrast and background level, Gaussian noise). The split is stratified by class over the SOURCE images (60/10/30,
all copies of a digit in the same split, so no near-duplicate crosses splits). Written in MedMNIST's .npz format
(``{train,val,test}_images`` uint8 N x 28 x 28, ``{train,val,test}_labels`` int64 N x 1), loadable with
``--dataset=npz --data_path=FILE`` (28x28 is zero-padded to 32x32 like MedMNIST).

Example:
    .venv/bin/python bench/make_hard_digits.py --out /tmp/hard_digits.npz
    .venv/bin/python main.py --config configs/digits/ccsi.yaml --dataset=npz --data_path=/tmp/hard_digits.npz
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.scenario import stratified_split

SIZE = 28


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def affine(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Random rotation (±25°), scales (0.75-1.1 per axis), shear (±0.3) and shift (±12% of the side), per image."""
    n = len(x)
    angle = uniform(n, -25, 25, gen) * strength * math.pi / 180
    sx, sy = (1 + strength * uniform(n, -0.25, 0.1, gen) for _ in range(2))
    shear = strength * uniform(n, -0.3, 0.3, gen)
    tx, ty = (strength * uniform(n, -0.12, 0.12, gen) for _ in range(2))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(  # inverse map output -> input coordinates, (N, 2, 3)
        [
            torch.stack([cos / sx, (-sin + shear * cos) / sx, tx], 1),
            torch.stack([sin / sy, (cos + shear * sin) / sy, ty], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def strokes_blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A third of the images thickened (3x3 max), a third thinned (3x3 min), then a random 3x3 blur mix."""
    kind = torch.randint(0, 3, (len(x),), generator=gen)[:, None, None, None]
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    x = torch.where(kind == 1, thick, torch.where(kind == 2, thin, x))
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    mix = uniform(len(x), 0.0, 1.0, gen)[:, None, None, None]
    return mix * blurred + (1 - mix) * x


def photometric(x: torch.Tensor, gen: torch.Generator, noise: float) -> torch.Tensor:
    """Contrast 0.5-1, background level 0-0.3, Gaussian noise of std up to ``noise``; clamped to [0, 1]."""
    n = len(x)
    contrast = uniform(n, 0.5, 1.0, gen)[:, None, None, None]
    background = uniform(n, 0.0, 0.3, gen)[:, None, None, None]
    std = uniform(n, 0.3, 1.0, gen)[:, None, None, None] * noise
    x = background + contrast * x * (1 - background) + std * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def make(seed: int, copies: int, strength: float, noise: float) -> dict[str, np.ndarray]:
    """The .npz arrays: split by source digit, ``copies`` distorted images per source."""
    from sklearn.datasets import load_digits

    data = load_digits()
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.as_tensor(data.target, dtype=torch.long)
    arrays = {}
    for name, idx in zip(("train", "val", "test"), stratified_split(y, (0.6, 0.1, 0.3), seed)):
        src = x[idx].repeat(copies, 1, 1, 1)  # (copies * n, 1, 28, 28)
        images = photometric(strokes_blur(affine(src, gen, strength), gen), gen, noise)
        arrays[f"{name}_images"] = (images[:, 0] * 255).round().to(torch.uint8).numpy()
        arrays[f"{name}_labels"] = y[idx].repeat(copies)[:, None].numpy()
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=1, help="distorted images per source digit")
    parser.add_argument("--strength", type=float, default=1.0, help="scale of the geometric distortions")
    parser.add_argument("--noise", type=float, default=0.12, help="largest std of the Gaussian pixel noise")
    args = parser.parse_args(argv)
    arrays = make(args.seed, args.copies, args.strength, args.noise)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    sizes = ", ".join(f"{s} {len(arrays[f'{s}_labels'])}" for s in ("train", "val", "test"))
    print(f"wrote {args.out}: {sizes} images of 28x28, 10 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
