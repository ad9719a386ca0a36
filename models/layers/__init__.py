"""Layers: Continual Normalization and cosine / growing classifiers."""

from models.layers.continual_norm import ContinualNorm, convert_bn_to_cn, norm_layers
from models.layers.cosine_linear import (
    HEAD_KINDS,
    CosineLinear,
    IncrementalHead,
    SplitCosineLinear,
    SplitLinear,
    cosine_scores,
)

__all__ = [
    "HEAD_KINDS",
    "ContinualNorm",
    "CosineLinear",
    "IncrementalHead",
    "SplitCosineLinear",
    "SplitLinear",
    "convert_bn_to_cn",
    "cosine_scores",
    "norm_layers",
]
