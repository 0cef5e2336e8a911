"""Shared fixtures: tiny, learnable data in the official Fashion-MNIST IDX format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(raw + array.astype(np.uint8).tobytes()))


def learnable_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright horizontal band whose row encodes the class: a small CNN learns it in a few epochs."""
    images = rng.integers(0, 90, (len(labels), 28, 28))
    for k in range(10):
        images[labels == k, 2 + 2 * k : 4 + 2 * k, :] += 160
    return images.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four Fashion-MNIST files: 512 training and 256 test examples."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 512), ("t10k", 256)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", learnable_images(labels, rng))
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder
