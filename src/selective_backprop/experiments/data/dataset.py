"""The dataset container: a whole image-classification split held as uint8 tensors on one device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Split = tuple[np.ndarray, np.ndarray]
"""``(images uint8 N x C x H x W, labels int64 N)`` as numpy arrays."""


@dataclass
class ArrayDataset:
    """A whole image-classification split held as tensors.

    Args:
        images: uint8 pixels, shape ``N x C x H x W``.
        labels: int64 class indices in ``[0, num_classes)``, shape ``N``, on the same device as ``images``.
        num_classes: number of classes.
        mean: per-channel mean of the training pixels, in ``[0, 1]`` pixel units (used by :func:`normalize`).
        std: per-channel standard deviation, same units.
        name: dataset name, e.g. ``"cifar10"``.

    Raises:
        ValueError: on a wrong dtype or rank, mismatched lengths or devices, or labels out of range.

    Example:
        >>> ds = ArrayDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 1]),
        ...                   num_classes=3, mean=(0.5,), std=(0.25,), name="toy")
        >>> len(ds), ds.to("cpu").images.shape
        (4, torch.Size([4, 1, 2, 2]))
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be a uint8 tensor N x C x H x W, got {self.images.dtype} with "
                f"shape {tuple(self.images.shape)}; convert with torch.as_tensor(array, dtype=torch.uint8)"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"{self.name}: labels must be a 1-D int64 tensor, got {self.labels.dtype} with shape "
                f"{tuple(self.labels.shape)}; use labels.long().flatten()"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels; pass one label per image"
            )
        if self.labels.device != self.images.device:
            raise ValueError(
                f"{self.name}: images on {self.images.device} but labels on {self.labels.device}; "
                "use ArrayDataset.to(device) to move both"
            )
        if self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: need one mean and one std per channel ({channels}), got mean={self.mean} std={self.std}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            # One host sync at construction time, never in the training loop.
            low, high = int(self.labels.min()), int(self.labels.max())
            raise ValueError(
                f"{self.name}: labels span [{low}, {high}] but must lie in [0, {self.num_classes}); "
                "fix the labels or pass the right num_classes"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        """The device holding ``images`` and ``labels``."""
        return self.images.device

    def to(self, device: torch.device | str) -> ArrayDataset:
        """Return a new dataset with both tensors on ``device`` (this one is left as it is)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))
