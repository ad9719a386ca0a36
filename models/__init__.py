"""Models: backbones (``resnet.py``), Continual Normalization and growing cosine heads (``layers/``).

``build_net(cfg, in_channels, image_size)`` builds the configured ``IncrementalNet`` with 0 classes;
the engine grows it with ``expand_head`` before each task.
"""

from __future__ import annotations

from torch import nn

from experiment.config import Config, ConfigError, Option, register_options
from models.layers.continual_norm import ContinualNorm, convert_bn_to_cn, norm_layers
from models.layers.cosine_linear import HEAD_KINDS, CosineLinear, IncrementalHead, SplitCosineLinear
from models.network import IncrementalNet
from models.resnet import BACKBONES, CCSIResNet, ImageSize, ImageTooSmallError, build_backbone

register_options(
    "model",
    [
        Option(
            "backbone",
            "str",
            "ccsi_resnet",
            "feature extractor; CCSI uses its small ResNet (256-d features)",
            choices=tuple(BACKBONES),
        ),
        Option(
            "norm",
            "str",
            "cn",
            "normalisation layers: cn = Continual Normalization (GN + BN, CCSI), bn = BatchNorm",
            choices=("cn", "bn"),
        ),
        Option("cn_groups", "int", 4, "GroupNorm groups inside Continual Normalization (CCSI and CN paper: 4)", min=1),
        Option(
            "cn_momentum",
            "float",
            0.1,
            "BatchNorm momentum inside CN, in (0, 1]; CN paper 0.1, the released CCSI code 1.0 (last batch)",
            min=0.0,
            max=1.0,
            min_exclusive=True,
        ),
        Option("head", "str", "cosine", "classifier: cosine (sigma * cos, LUCIR/CCSI) or linear", choices=HEAD_KINDS),
    ],
)


def build_net(cfg: Config, in_channels: int, image_size: ImageSize) -> IncrementalNet:
    """The configured backbone (BatchNorm2d, converted to CN when ``norm == "cn"``) with an empty head.

    ``image_size`` is the side of square images or (H, W); images too small for the backbone raise ConfigError.
    """
    try:
        backbone = build_backbone(cfg.backbone, in_channels, image_size, norm_layer=nn.BatchNorm2d)
    except ImageTooSmallError as err:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        raise ConfigError(
            f"key 'backbone': {cfg.backbone} needs images of at least {err.min_size}x{err.min_size} px (its "
            f"{err.pool_kernel}x{err.pool_kernel} pooling window), but the images are {h}x{w}; use "
            "--backbone=resnet32 (global pooling, any size) or larger images"
        ) from None
    if cfg.norm == "cn":
        bad = sorted({bn.num_features for bn in norm_layers(backbone) if bn.num_features % cfg.cn_groups})
        if bad:
            raise ConfigError(f"key 'cn_groups': {cfg.cn_groups} does not divide the channel counts {bad}")
        convert_bn_to_cn(backbone, cfg.cn_groups, cfg.cn_momentum)
    return IncrementalNet(backbone, cfg.head)


__all__ = [
    "BACKBONES",
    "CCSIResNet",
    "ContinualNorm",
    "CosineLinear",
    "IncrementalHead",
    "IncrementalNet",
    "SplitCosineLinear",
    "build_backbone",
    "build_net",
    "convert_bn_to_cn",
    "norm_layers",
]
