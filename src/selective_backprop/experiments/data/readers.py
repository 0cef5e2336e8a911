"""Readers of the official file formats (IDX, CIFAR pickle tarballs, SVHN .mat). Corrupt or truncated files
raise :class:`ValueError` naming the file; never a silently partial dataset."""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Split

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _corrupt(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}; the file is corrupt or incomplete: delete it and download it again")


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when the name ends in ``.gz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _corrupt(path, f"cannot gunzip ({type(e).__name__}: {e})") from e


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (``.gz``) or plain.

    Args:
        path: the file.

    Returns:
        The array with the dims and dtype the header declares (native byte order).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming ``path`` on a bad gzip stream, wrong magic, or a payload of the wrong length.

    Example:
        >>> import struct, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = Path(d) / "x.idx"
        ...     _ = p.write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 8, 9]))
        ...     read_idx(p)
        array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise _corrupt(path, f"not an IDX file (magic {raw[:4].hex() or 'missing'}, expected 0000<type><ndim>)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"header truncated: {len(raw)} bytes for {ndim} dims")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise _corrupt(path, f"{len(raw)} bytes but dims {dims} of {dtype} need {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _check_split(images: np.ndarray, labels: np.ndarray, num_classes: int, source: Path) -> Split:
    """Validate one decoded split against the expectations of :class:`ArrayDataset`."""
    if len(images) != len(labels):
        raise _corrupt(source, f"{len(images)} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(source, f"labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes})")
    return np.ascontiguousarray(images, dtype=np.uint8), labels


def read_fashion_mnist(folder: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Read Fashion-MNIST's four official IDX files (``train-images-idx3-ubyte.gz`` etc.) from ``folder``.

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``, images ``N x 1 x 28 x 28`` uint8.

    Raises:
        FileNotFoundError: when one of the four files is missing.
        ValueError: naming the file when one is corrupt or images and labels disagree.
    """
    folder = Path(folder)
    splits = []
    for prefix in ("train", "t10k"):
        image_path = folder / f"{prefix}-images-idx3-ubyte.gz"
        label_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise _corrupt(image_path, f"expected uint8 images N x H x W, got {images.dtype} {images.shape}")
        if labels.ndim != 1:
            raise _corrupt(label_path, f"expected 1-D labels, got shape {labels.shape}")
        if len(images) != len(labels):
            raise _corrupt(label_path, f"{len(labels)} labels for {len(images)} images in {image_path.name}")
        splits.append(_check_split(images[:, None], labels, 10, label_path))
    return splits[0], splits[1]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch cannot run arbitrary code."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): codecs.encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # ndarray.__reduce__ names its reconstructor; its module moved in numpy 2 (numpy.core -> numpy._core).
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None


def _cifar_batch(raw: bytes, label_key: bytes, num_classes: int, source: Path) -> Split:
    """Decode one pickled CIFAR batch (``{b"data": N x 3072 uint8, label_key: [int]}``)."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise _corrupt(source, f"cannot unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise _corrupt(source, f"expected a dict with b'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(source, f"b'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each a row-major 32 x 32 plane.
    return _check_split(data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key]), num_classes, source)


_CIFAR_LAYOUT = {
    # name: (tarball, top folder inside it, train members, test members, label key, classes)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}


def _tar_members(path: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the named regular-file members, in one pass over the (gzipped) tarball."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.name in names and member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular file always has content
                    found[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"cannot read the tarball ({type(e).__name__}: {e})") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise _corrupt(path, f"missing members {missing}")
    return found


def read_cifar(folder: str | os.PathLike[str], name: str = "cifar10") -> tuple[Split, Split]:
    """Read CIFAR-10 or CIFAR-100 from the official python-pickle release.

    ``folder`` may hold the tarball (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), the folder
    extracted from it (``cifar-10-batches-py`` / ``cifar-100-python``), or be that extracted folder. CIFAR-100
    uses the 100 fine labels.

    Args:
        folder: where the files are.
        name: ``"cifar10"`` or ``"cifar100"``. Default: ``"cifar10"``.

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``, images ``N x 3 x 32 x 32`` uint8;
        CIFAR-10's five training batches are concatenated in order.

    Raises:
        FileNotFoundError: when neither the tarball nor the extracted files are there.
        ValueError: naming the file (and member) that is corrupt, truncated or missing.
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {name!r}; use 'cifar10' or 'cifar100'")
    tarball, top, train, test, label_key, num_classes = _CIFAR_LAYOUT[name]
    folder = Path(folder)
    members = train + test
    if (folder / tarball).is_file():
        path = folder / tarball
        raw = _tar_members(path, [f"{top}/{m}" for m in members])
        sources = {m: (raw[f"{top}/{m}"], Path(f"{path}:{top}/{m}")) for m in members}
    else:
        extracted = folder / top if (folder / top).is_dir() else folder
        if not all((extracted / m).is_file() for m in members):
            raise FileNotFoundError(f"{folder}: neither {tarball} nor the extracted {top}/ files {list(members)}")
        sources = {m: ((extracted / m).read_bytes(), extracted / m) for m in members}
    splits = []
    for part in (train, test):
        batches = [_cifar_batch(sources[m][0], label_key, num_classes, sources[m][1]) for m in part]
        splits.append((np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])))
    return splits[0], splits[1]


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        import scipy.io
    except ImportError as e:
        raise ImportError("reading SVHN's .mat files needs scipy: pip install 'selective-backprop[experiments]'") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return scipy.io.loadmat(path)
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, f"cannot read the MATLAB file ({type(e).__name__}: {e})") from e


def read_svhn(folder: str | os.PathLike[str], extra: bool = False) -> tuple[Split, Split]:
    """Read SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat``) from ``folder``; with ``extra``, the
    training split also holds ``extra_32x32.mat`` (73,257 + 531,131 = 604,388 images), after the train images.

    The files store ``X`` as ``32 x 32 x 3 x N`` and ``y`` as ``N x 1`` with label 10 for the digit 0; this
    returns images ``N x 3 x 32 x 32`` and maps 10 to 0 so the labels are the digits. Needs scipy (the
    ``experiments`` extra).

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``.

    Raises:
        ImportError: when scipy is not installed.
        FileNotFoundError: when a file is missing.
        ValueError: naming the file when it is corrupt or its arrays have the wrong shape.
    """
    folder = Path(folder)
    splits = []
    for split in ("train", "test", *(("extra",) if extra else ())):
        path = folder / f"{split}_32x32.mat"
        mat = _loadmat(path)
        if "X" not in mat or "y" not in mat:
            raise _corrupt(path, f"expected variables 'X' and 'y', got {sorted(k for k in mat if k[0] != '_')}")
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise _corrupt(path, f"'X' must be uint8 32 x 32 x 3 x N, got {x.dtype} {x.shape}")
        y = y.reshape(-1).astype(np.int64)
        splits.append(_check_split(x.transpose(3, 2, 0, 1), np.where(y == 10, 0, y), 10, path))
    if extra:
        (train_x, train_y), (extra_x, extra_y) = splits[0], splits[2]
        splits[0] = (np.concatenate([train_x, extra_x]), np.concatenate([train_y, extra_y]))
    return splits[0], splits[1]
