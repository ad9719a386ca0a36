"""Backbones for small (32x32) images: the CCSI small ResNet, CIFAR ResNet-32 and a CIFAR-style ResNet-18.

Each backbone maps images (B, C, H, W) to features (B, out_dim). The norm layer is a constructor argument
(BatchNorm2d by default); Continual Normalization is applied afterwards with ``convert_bn_to_cn``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]
ImageSize = int | tuple[int, int]  # side of square images, or (H, W)


def _conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


class ImageTooSmallError(ValueError):
    """Images whose feature maps are smaller than the backbone's pooling window; ``min_size`` px per side fit."""

    def __init__(self, message: str, min_size: int, pool_kernel: int):
        super().__init__(message)
        self.min_size, self.pool_kernel = min_size, pool_kernel


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm, plus shortcut (1x1 conv + norm when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                norm_layer(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3 + norm + ReLU, stages of BasicBlocks, then pooling and flattening to ``out_dim`` features.

    Args:
        widths/depths/strides: channels, number of blocks and first-block stride of each stage.
        pool_kernel: None for global average pooling (out_dim = last width); k for AvgPool2d(k, stride k)
            followed by flattening (out_dim = last width * pooled area), as in CCSI.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: ImageSize,
        widths: Sequence[int],
        depths: Sequence[int],
        strides: Sequence[int],
        stem_stride: int = 1,
        pool_kernel: int | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        if not len(widths) == len(depths) == len(strides):
            raise ValueError(f"widths {widths}, depths {depths} and strides {strides} must have the same length")
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if in_channels < 1 or len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"in_channels and image_size must be >= 1, got {in_channels} and {image_size}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU()
        size = [_conv_out(s, stem_stride) for s in hw]
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for width, depth, stride in zip(widths, depths, strides):
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(in_planes, width, stride if i == 0 else 1, norm_layer))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
            size = [_conv_out(s, stride) for s in size]
        self.layers = nn.Sequential(*stages)
        if pool_kernel is None:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.out_dim = in_planes
        else:
            if min(size) < pool_kernel:
                need = pool_kernel
                for stride in reversed((stem_stride, *strides)):
                    need = (need - 1) * stride + 1  # smallest input side giving `need` after this convolution
                raise ImageTooSmallError(
                    f"image_size={image_size} gives {size[0]}x{size[1]} feature maps, smaller than the "
                    f"{pool_kernel}x{pool_kernel} pooling window (images need at least {need} px per side)",
                    need,
                    pool_kernel,
                )
            pooled = [(s - pool_kernel) // pool_kernel + 1 for s in size]
            self.pool = nn.AvgPool2d(pool_kernel, stride=pool_kernel)
            self.out_dim = in_planes * pooled[0] * pooled[1]
        self.image_size = image_size
        self.in_channels = in_channels
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, widths[0], H', W')
        out = self.layers(out)
        return self.pool(out).flatten(1)  # (B, out_dim)


class CCSIResNet(ResNet):
    """CCSI small ResNet: stride-2 stem to 16 channels, one BasicBlock per stage (16, 32, 64), all stride 1,
    AvgPool2d(7, stride 7) on the 16x16 maps -> 2x2 -> 256-d features for 32x32 input."""

    def __init__(self, in_channels: int = 3, image_size: ImageSize = 32, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__(
            in_channels,
            image_size,
            widths=(16, 32, 64),
            depths=(1, 1, 1),
            strides=(1, 1, 1),
            stem_stride=2,
            pool_kernel=7,
            norm_layer=norm_layer,
        )


def ccsi_resnet(in_channels: int = 3, image_size: ImageSize = 32, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    """The CCSI small ResNet (256-d features at 32x32)."""
    return CCSIResNet(in_channels, image_size, norm_layer)


def resnet32(in_channels: int = 3, image_size: ImageSize = 32, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    """CIFAR ResNet-32: 3 stages x 5 BasicBlocks (16/32/64 channels, strides 1/2/2), global pool -> 64-d.

    Shortcuts that change shape are 1x1 conv + norm (He et al.'s option B, as in LUCIR's code).
    """
    return ResNet(in_channels, image_size, (16, 32, 64), (5, 5, 5), (1, 2, 2), norm_layer=norm_layer)


def resnet18(in_channels: int = 3, image_size: ImageSize = 32, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    """ResNet-18 for 32x32 input: conv3x3 stride-1 stem, no max-pool, 64/128/256/512 x 2 blocks -> 512-d."""
    return ResNet(in_channels, image_size, (64, 128, 256, 512), (2, 2, 2, 2), (1, 2, 2, 2), norm_layer=norm_layer)


BACKBONES: dict[str, Callable[..., ResNet]] = {
    "ccsi_resnet": ccsi_resnet,
    "resnet32": resnet32,
    "resnet18": resnet18,
}


def build_backbone(
    name: str, in_channels: int, image_size: ImageSize, norm_layer: NormLayer = nn.BatchNorm2d
) -> ResNet:
    """The backbone registered as ``name``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](in_channels=in_channels, image_size=image_size, norm_layer=norm_layer)
