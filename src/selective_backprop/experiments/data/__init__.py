"""Datasets as uint8 tensors on the training device, with batch-wise augmentation on that device.

The training loop needs ``(inputs, targets, indices)`` batches: Selective-Backprop (Jiang et al. 2019,
https://arxiv.org/abs/1910.00762) keeps a loss history keyed by example, and the label-noise experiments
need to know which examples were corrupted. Following airbench, the whole set lives on the device as one
uint8 tensor; shuffling is an on-device ``randperm`` and normalization/augmentation run on whole batches.
There are no per-example Python objects and no DataLoader workers.

* :class:`ArrayDataset` -- images ``N x C x H x W`` uint8, labels int64, plus per-channel mean/std.
* :func:`load_dataset` -- Fashion-MNIST, CIFAR-10, CIFAR-100 or SVHN from the official files (optionally
  downloaded and checked against their MD5); :func:`locate_dataset` -- where they are, without reading them.
* :func:`read_idx`, :func:`read_fashion_mnist`, :func:`read_cifar`, :func:`read_svhn` -- the format readers.
  Corrupt or truncated files raise :class:`ValueError` naming the file; never a silently partial dataset.
* :func:`apply_label_noise` -- the paper's randomized-label experiment.
* :func:`random_crop`, :func:`random_flip`, :func:`cutout`, :func:`normalize`, :class:`Augment` -- batch ops.
* :class:`DeviceLoader` -- seeded, resumable iteration over an :class:`ArrayDataset`; :class:`ShardedLoader` --
  one rank's static shard of it (torchrun).
"""

from __future__ import annotations

from .augment import Augment, cutout, default_augment, normalize, random_crop, random_flip
from .dataset import ArrayDataset, Split
from .loader import DeviceLoader, ShardedLoader
from .noise import apply_label_noise
from .readers import read_cifar, read_fashion_mnist, read_idx, read_svhn
from .registry import (
    DATA_DIR_ENV,
    DATASETS,
    DEFAULT_DATA_DIRS,
    DatasetSpec,
    RemoteFile,
    cache_dir,
    download,
    load_dataset,
    locate_dataset,
)

__all__ = [
    "ArrayDataset",
    "Augment",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIRS",
    "DatasetSpec",
    "DeviceLoader",
    "RemoteFile",
    "ShardedLoader",
    "Split",
    "apply_label_noise",
    "cache_dir",
    "cutout",
    "default_augment",
    "download",
    "load_dataset",
    "locate_dataset",
    "normalize",
    "random_crop",
    "random_flip",
    "read_cifar",
    "read_fashion_mnist",
    "read_idx",
    "read_svhn",
]
