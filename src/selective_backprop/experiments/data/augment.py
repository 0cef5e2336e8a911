"""Batch augmentation on the device: random crop, flip, cutout and normalization, from a seeded generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _draw(fn: Callable[..., Tensor], *args: Any, generator: torch.Generator, device: torch.device) -> Tensor:
    """Draw on the generator's device (torch requires it), then move to the batch's device."""
    return fn(*args, generator=generator, device=generator.device).to(device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each image by ``padding`` pixels per side, then crop back to ``H x W`` at a random offset.

    Offsets are drawn per example, uniform in ``[0, 2 * padding]`` for rows then columns.

    Args:
        x: batch ``N x C x H x W`` of any dtype.
        padding: pixels of zeros per side; 0 returns ``x`` unchanged without drawing.
        generator: source of all randomness.

    Returns:
        A new batch with the shape and dtype of ``x``.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> random_crop(x, 2, torch.Generator().manual_seed(0)).shape
        torch.Size([1, 1, 4, 4])
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = _draw(torch.randint, 0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    dx = _draw(torch.randint, 0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2.

    Image ``i`` is flipped when ``torch.rand(N, generator=generator)[i] < 0.5``.

    Args:
        x: batch ``N x C x H x W``.
        generator: source of the coins.

    Returns:
        A new batch with the shape and dtype of ``x``.

    Example:
        >>> x = torch.arange(4.0).view(2, 1, 1, 2)
        >>> random_flip(x, torch.Generator().manual_seed(0)).flatten().tolist()
        [1.0, 0.0, 2.0, 3.0]
    """
    coins = _draw(torch.rand, len(x), generator=generator, device=x.device) < 0.5
    return torch.where(coins[:, None, None, None], x.flip(3), x)


def cutout(x: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """Zero a ``length x length`` square per image, at a random center (DeVries & Taylor 2017).

    Centers are uniform over all pixels (rows then columns drawn); the square spans rows
    ``[cy - length // 2, cy - length // 2 + length)`` and likewise for columns, clipped at the borders, so a
    square near an edge zeroes fewer pixels. Applied after :func:`normalize` (as in the original code), the
    zeros are the mean color.

    Args:
        x: batch ``N x C x H x W``.
        length: side of the square in pixels; 0 returns ``x`` unchanged without drawing.
        generator: source of the centers.

    Returns:
        A new batch with the shape and dtype of ``x``.

    Example:
        >>> out = cutout(torch.ones(2, 3, 8, 8), 4, torch.Generator().manual_seed(0))
        >>> out.shape, bool((out == 0).sum() <= 2 * 3 * 16)
        (torch.Size([2, 3, 8, 8]), True)
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length == 0:
        return x
    n, _, h, w = x.shape
    cy = _draw(torch.randint, 0, h, (n,), generator=generator, device=x.device)
    cx = _draw(torch.randint, 0, w, (n,), generator=generator, device=x.device)
    top, left = (cy - length // 2)[:, None], (cx - length // 2)[:, None]
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + length)  # N x H
    in_cols = (cols >= left) & (cols < left + length)  # N x W
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(mask, 0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Convert uint8 pixels to float32 ``(x / 255 - mean) / std``, per channel.

    Args:
        x: uint8 batch ``N x C x H x W``.
        mean: per-channel mean in ``[0, 1]`` pixel units.
        std: per-channel standard deviation, same units.

    Returns:
        float32 batch on ``x.device``.

    Example:
        >>> normalize(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), (0.5,), (0.5,)).flatten().tolist()
        [-1.0, 1.0]
    """
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"need one mean and std per channel ({x.shape[1]}), got mean={mean} std={std}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean_t) / std_t


@dataclass
class Augment:
    """Training augmentation, applied to whole batches on the device.

    Args:
        crop_padding: :func:`random_crop` padding in pixels; 0 disables. Default: ``0``.
        flip: apply :func:`random_flip`. Default: ``False``.
        cutout: :func:`cutout` square side in pixels; 0 disables. Default: ``0``.
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.cutout < 0:
            raise ValueError(f"crop_padding and cutout must be >= 0, got {self}")

    def apply(self, x: Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator) -> Tensor:
        """Crop and flip the uint8 batch, normalize it to float32, then cut out (zeros = the mean color).

        Example:
            >>> x = torch.full((2, 1, 4, 4), 128, dtype=torch.uint8)
            >>> Augment(crop_padding=1, flip=True, cutout=2).apply(x, (0.5,), (0.5,), torch.Generator()).dtype
            torch.float32
        """
        x = random_crop(x, self.crop_padding, generator)
        if self.flip:
            x = random_flip(x, generator)
        return cutout(normalize(x, mean, std), self.cutout, generator)


_DEFAULT_AUGMENT = {
    # The paper's setups: crop + flip + cutout (DeVries & Taylor's lengths) on CIFAR; no flips for digits.
    "cifar10": Augment(crop_padding=4, flip=True, cutout=16),
    "cifar100": Augment(crop_padding=4, flip=True, cutout=8),
    "svhn": Augment(cutout=20),  # DeVries & Taylor 2017's WRN-16-8 setup the paper cites: cutout only, no crop
    "svhn-extra": Augment(cutout=20),
    "fashion-mnist": Augment(),
}


def default_augment(name: str) -> Augment:
    """The authors' training augmentation for a dataset in :data:`DATASETS`.

    Example:
        >>> default_augment("cifar10")
        Augment(crop_padding=4, flip=True, cutout=16)
    """
    if name not in _DEFAULT_AUGMENT:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(_DEFAULT_AUGMENT)}")
    return dataclasses.replace(_DEFAULT_AUGMENT[name])


# ----------------------------------------------------------------------------------------------------------
