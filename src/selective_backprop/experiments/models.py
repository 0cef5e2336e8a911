"""Image classifiers written by hand, and a registry that builds them by name.

The architectures are the ones Selective-Backprop was evaluated with
(`Jiang et al. 2019 <https://arxiv.org/abs/1910.00762>`_): the CIFAR variants of ResNet-18 and MobileNetV2
from `kuangliu/pytorch-cifar <https://github.com/kuangliu/pytorch-cifar>`_, and WideResNet for SVHN.
``small-cnn`` is a cheap two-conv net for Fashion-MNIST on CPU. Every model maps ``N x C x H x W`` images
to raw logits ``N x num_classes`` and pools adaptively before its head: 28 x 28 and 32 x 32 inputs work alike.

Example:
    >>> import torch
    >>> from selective_backprop.experiments.models import build_model
    >>> model = build_model("small-cnn", num_classes=10, in_channels=1)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "MobileNetV2", "ResNet18", "SmallCNN", "WideResNet", "build_model", "init_weights"]


def init_weights(module: nn.Module) -> None:
    """Initialise one module in place: Kaiming-normal convs, BatchNorm weight 1 and bias 0.

    Linear layers keep PyTorch's default init, as in torchvision's ResNet. Use with ``model.apply``.

    Args:
        module: Any module; only ``nn.Conv2d`` and ``nn.BatchNorm2d`` are changed.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> with torch.no_grad():
        ...     _ = bn.weight.fill_(3.0)
        >>> init_weights(bn)
        >>> bn.weight.tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_io(model: str, num_classes: int, in_channels: int) -> None:
    if num_classes < 1:
        raise ValueError(f"{model}: num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"{model}: in_channels must be >= 1 (1 for grayscale, 3 for RGB), got {in_channels}")


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``kernel_size`` conv with 'same' padding and no bias (BatchNorm has one), then BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer head: cheap enough to train on Fashion-MNIST on a few CPU cores.

    ``[conv3x3 - BN - ReLU - maxpool2] x 2 (width, 2 * width channels) -> flatten -> Linear(hidden) - ReLU ->
    Linear(num_classes)``. The feature map is adaptively average-pooled to 7 x 7 before flattening: on 28 x 28
    inputs this is the identity, and it lets the same head take 32 x 32 (CIFAR-sized) images.

    Args:
        num_classes: Number of output logits. Default: ``10``.
        in_channels: Channels of the input images. Default: ``3``.
        width: Channels of the first conv; the second has twice as many. Default: ``32``.
        hidden: Units of the hidden linear layer. Default: ``128``.

    Raises:
        ValueError: If any size is below 1.

    Example:
        >>> import torch
        >>> model = SmallCNN(num_classes=10, in_channels=1, width=8, hidden=16)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    grid = 7  # 28 // 4: spatial size after two 2x poolings of a Fashion-MNIST image.

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        _check_io("SmallCNN", num_classes, in_channels)
        if width < 1 or hidden < 1:
            raise ValueError(f"SmallCNN: width and hidden must be >= 1, got width={width}, hidden={hidden}")
        self.features = nn.Sequential(
            _conv_bn(in_channels, width, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(self.grid),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * self.grid**2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``N x num_classes`` for images ``N x in_channels x H x W``."""
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet basic block (post-activation): two 3x3 convs plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = _conv_bn(out_ch, out_ch, 3)
        reshape = stride != 1 or in_ch != out_ch
        self.shortcut = _conv_bn(in_ch, out_ch, 1, stride) if reshape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32 x 32 images, as in kuangliu/pytorch-cifar: 11,173,962 parameters for 10 classes.

    Unlike the ImageNet ResNet, the stem is a single 3x3 stride-1 conv with no max-pool, so a 32 x 32 image
    keeps its resolution through the first stage. Four stages of two basic blocks with 64, 128, 256 and 512
    channels (strides 1, 2, 2, 2), then global average pooling and a linear layer.

    Args:
        num_classes: Number of output logits. Default: ``10``.
        in_channels: Channels of the input images. Default: ``3``.

    Raises:
        ValueError: If ``num_classes`` or ``in_channels`` is below 1.

    Example:
        >>> import torch
        >>> model = ResNet18(num_classes=100).eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_io("ResNet18", num_classes, in_channels)
        self.stem = _conv_bn(in_channels, 64, 3)
        layers: list[nn.Module] = []
        in_ch = 64
        for out_ch, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [_BasicBlock(in_ch, out_ch, stride), _BasicBlock(out_ch, out_ch, 1)]
            in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``N x num_classes`` for images ``N x in_channels x H x W``."""
        out = self.layers(F.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(out), 1))


class _WideBlock(nn.Module):
    """Pre-activation WRN block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus a shortcut.

    When the shape changes, the 1x1 shortcut conv reads the pre-activated input, as in the reference code.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016).

    Paper: https://arxiv.org/abs/1605.07146.

    A 3x3 stem conv with 16 channels, three groups of ``(depth - 4) / 6`` pre-activation blocks with
    ``16k``, ``32k`` and ``64k`` channels (``k = widen_factor``, strides 1, 2, 2), then BN-ReLU, global
    average pooling and a linear layer. The SB paper trains a WRN on SVHN. WRN-28-10 has 36,479,194
    parameters for 10 classes; use a small ``widen_factor`` (e.g. 2 or 4) when compute is tight.

    Args:
        num_classes: Number of output logits. Default: ``10``.
        in_channels: Channels of the input images. Default: ``3``.
        depth: Total number of weighted layers; must satisfy ``(depth - 4) % 6 == 0``. Default: ``28``.
        widen_factor: Channel multiplier ``k``. Default: ``10``.
        dropout: Dropout probability between the two convs of each block, in ``[0, 1)``. Default: ``0.0``.

    Raises:
        ValueError: If ``depth`` is not ``6n + 4`` with ``n >= 1``, ``widen_factor < 1``, ``dropout`` is
            outside ``[0, 1)``, or ``num_classes``/``in_channels`` is below 1.

    Example:
        >>> import torch
        >>> model = WideResNet(num_classes=10, depth=10, widen_factor=1).eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_io("WideResNet", num_classes, in_channels)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet: depth must be 6n + 4 with n >= 1 (e.g. 10, 16, 22, 28, 40), got depth={depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet: widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet: dropout must be in [0, 1), got {dropout}")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_ch = 16
        for out_ch, stride in zip(widths, (1, 2, 2), strict=True):
            for i in range(blocks_per_group):
                blocks.append(_WideBlock(in_ch, out_ch, stride if i == 0 else 1, dropout))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``N x num_classes`` for images ``N x in_channels x H x W``."""
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - 3x3 depthwise - 1x1 linear projection, with a shortcut at stride 1.

    As in kuangliu/pytorch-cifar, stride-1 blocks that change width get a 1x1-conv shortcut (the paper's
    have none).
    """

    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int) -> None:
        super().__init__()
        mid = expansion * in_ch
        self.expand = _conv_bn(in_ch, mid, 1)
        self.depthwise = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.project = _conv_bn(mid, out_ch, 1)
        self.shortcut: nn.Module | None = None
        if stride == 1:
            self.shortcut = nn.Identity() if in_ch == out_ch else _conv_bn(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(F.relu(self.depthwise(F.relu(self.expand(x)))))
        return out if self.shortcut is None else out + self.shortcut(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32 x 32 images, as in kuangliu/pytorch-cifar: 2,296,922 parameters for 10 classes.

    Paper: Sandler et al. 2018, https://arxiv.org/abs/1801.04381.

    The CIFAR variant keeps more resolution than the ImageNet one: the stem conv and the second stage have
    stride 1 instead of 2, so a 32 x 32 image is downsampled only three times (to 4 x 4). Channel counts are
    scaled by ``width_mult`` and rounded to multiples of 8; the last 1x1 conv keeps at least 1280 channels.

    Args:
        num_classes: Number of output logits. Default: ``10``.
        in_channels: Channels of the input images. Default: ``3``.
        width_mult: Multiplier on every channel count. Default: ``1.0``.

    Raises:
        ValueError: If ``width_mult <= 0`` or ``num_classes``/``in_channels`` is below 1.

    Example:
        >>> import torch
        >>> model = MobileNetV2(num_classes=10, width_mult=0.25).eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    # (expansion, out_channels, num_blocks, stride of the first block) per stage. Stage 2 has stride 1, not 2.
    stages = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        _check_io("MobileNetV2", num_classes, in_channels)
        if width_mult <= 0:
            raise ValueError(f"MobileNetV2: width_mult must be > 0, got {width_mult}")
        in_ch = _make_divisible(32 * width_mult)
        self.stem = _conv_bn(in_channels, in_ch, 3)
        blocks: list[nn.Module] = []
        for expansion, channels, num_blocks, stride in self.stages:
            out_ch = _make_divisible(channels * width_mult)
            for i in range(num_blocks):
                blocks.append(_InvertedResidual(in_ch, out_ch, expansion, stride if i == 0 else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        self.head = _conv_bn(in_ch, last_ch, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_ch, num_classes)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``N x num_classes`` for images ``N x in_channels x H x W``."""
        out = F.relu(self.head(self.blocks(F.relu(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(out), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": SmallCNN,
    "resnet18": ResNet18,
    "wideresnet": WideResNet,
    "mobilenetv2": MobileNetV2,
}
"""Model name -> constructor taking ``num_classes``, ``in_channels`` and model-specific keyword options."""


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model from the :data:`MODELS` registry.

    Args:
        name: Registry key, e.g. ``"small-cnn"`` or ``"resnet18"``.
        num_classes: Number of output logits. Default: ``10``.
        in_channels: Channels of the input images (1 for Fashion-MNIST, 3 for CIFAR/SVHN). Default: ``3``.
        **kwargs: Model-specific options, e.g. ``width`` for ``small-cnn`` or ``depth`` for ``wideresnet``.

    Returns:
        The model in train mode, on the CPU, returning raw logits of shape ``N x num_classes``.

    Raises:
        ValueError: If ``name`` is not registered, or an option has an invalid value.
        TypeError: If ``kwargs`` holds an option the model does not take.

    Example:
        >>> import torch
        >>> model = build_model("wideresnet", num_classes=100, depth=10, widen_factor=1)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    factory = MODELS[name]
    options = [p for p in inspect.signature(factory).parameters if p not in ("num_classes", "in_channels")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"model {name!r} got unexpected option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(options) or 'no options'}"
        )
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
