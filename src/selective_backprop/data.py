"""Datasets as uint8 tensors on the training device, with batch-wise augmentation on that device.

The training loop needs ``(inputs, targets, indices)`` batches: Selective-Backprop (Jiang et al. 2019,
https://arxiv.org/abs/1910.00762) keeps a loss history keyed by example, and the label-noise experiments
need to know which examples were corrupted. Following airbench, the whole set lives on the device as one
uint8 tensor; shuffling is an on-device ``randperm`` and normalization/augmentation run on whole batches.
There are no per-example Python objects and no DataLoader workers.

* :class:`ArrayDataset` -- images ``N x C x H x W`` uint8, labels int64, plus per-channel mean/std.
* :func:`load_dataset` -- Fashion-MNIST, CIFAR-10, CIFAR-100 or SVHN from the official files (optionally
  downloaded and checked against their MD5).
* :func:`read_idx`, :func:`read_fashion_mnist`, :func:`read_cifar`, :func:`read_svhn` -- the format readers.
  Corrupt or truncated files raise :class:`ValueError` naming the file; never a silently partial dataset.
* :func:`apply_label_noise` -- the paper's randomized-label experiment.
* :func:`random_crop`, :func:`random_flip`, :func:`cutout`, :func:`normalize`, :class:`Augment` -- batch ops.
* :class:`DeviceLoader` -- seeded, resumable iteration over an :class:`ArrayDataset`.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ArrayDataset",
    "Augment",
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "DatasetSpec",
    "DeviceLoader",
    "RemoteFile",
    "apply_label_noise",
    "cache_dir",
    "cutout",
    "default_augment",
    "download",
    "load_dataset",
    "normalize",
    "random_crop",
    "random_flip",
    "read_cifar",
    "read_fashion_mnist",
    "read_idx",
    "read_svhn",
]

Split = tuple[np.ndarray, np.ndarray]
"""``(images uint8 N x C x H x W, labels int64 N)`` as numpy arrays."""

Downloader = Callable[[str, Path, str], None]
"""``downloader(url, dest, md5)``: fetch ``url`` to ``dest`` and check its MD5 (see :func:`download`)."""


# ----------------------------------------------------------------------------------------------------------
# The dataset container


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


# ----------------------------------------------------------------------------------------------------------
# Format readers

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


def read_svhn(folder: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Read SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat``) from ``folder``.

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
    for split in ("train", "test"):
        path = folder / f"{split}_32x32.mat"
        mat = _loadmat(path)
        if "X" not in mat or "y" not in mat:
            raise _corrupt(path, f"expected variables 'X' and 'y', got {sorted(k for k in mat if k[0] != '_')}")
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise _corrupt(path, f"'X' must be uint8 32 x 32 x 3 x N, got {x.dtype} {x.shape}")
        y = y.reshape(-1).astype(np.int64)
        splits.append(_check_split(x.transpose(3, 2, 0, 1), np.where(y == 10, 0, y), 10, path))
    return splits[0], splits[1]


# ----------------------------------------------------------------------------------------------------------
# Download


def download(url: str, dest: str | os.PathLike[str], md5: str) -> None:
    """Download ``url`` to ``dest``, atomically, and only if its MD5 matches.

    The bytes go to a temporary file next to ``dest``, which is renamed onto ``dest`` (``os.replace``) after
    the checksum matches and deleted otherwise, so ``dest`` is either absent or complete and verified. Shows a
    tqdm progress bar when tqdm is installed.

    Args:
        url: anything ``urllib.request.urlopen`` accepts (``https://``, ``file://``).
        dest: the file to create; its folder is created if needed.
        md5: the expected hex digest.

    Raises:
        ValueError: when the MD5 of the downloaded bytes differs (``dest`` is not created).
        OSError: on network or disk errors (``urllib.error.URLError`` is one).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            try:
                from tqdm import tqdm

                bar: Any = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            except ImportError:
                bar = None
            try:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if digest.hexdigest() != md5.lower():
            raise ValueError(
                f"{url}: MD5 {digest.hexdigest()} does not match the expected {md5}; the download is corrupt "
                f"or the file changed upstream; {dest} was not written, try again"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


_download_file = download  # `load_dataset` has a parameter named `download`


# ----------------------------------------------------------------------------------------------------------
# Registry and loading


@dataclass(frozen=True)
class RemoteFile:
    """One official file: where to get it and its MD5."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        """The last part of the URL, which is also the name on disk."""
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSpec:
    """What :func:`load_dataset` knows about one dataset.

    Args:
        name: registry key.
        num_classes: number of classes.
        mean: per-channel training-set mean, ``[0, 1]`` pixel units.
        std: per-channel training-set standard deviation, same units.
        files: the official files, which :func:`download` fetches.
        layouts: alternative sets of names (files or folders); a folder holds the data when all names of one
            set exist in it.
        reader: ``reader(folder) -> (train, test)`` decoding the files.
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: tuple[RemoteFile, ...]
    layouts: tuple[tuple[str, ...], ...]
    reader: Callable[[Path], tuple[Split, Split]]

    def present_in(self, folder: Path) -> bool:
        """Whether ``folder`` holds a complete copy of the data in one of the known layouts."""
        return any(all((folder / n).exists() for n in layout) for layout in self.layouts)


_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FMNIST_FILES = (
    RemoteFile(_FMNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    RemoteFile(_FMNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    RemoteFile(_FMNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    RemoteFile(_FMNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
)
_CIFAR10_FILE = RemoteFile(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
)
_CIFAR100_FILE = RemoteFile(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"
)
_SVHN_FILES = (
    RemoteFile("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    RemoteFile("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b2cd1a5c7d"),
)


def _cifar_layouts(name: str) -> tuple[tuple[str, ...], ...]:
    tarball, top, train, test, *_ = _CIFAR_LAYOUT[name]
    return (tarball,), (top,), train + test


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        10,
        (0.2860,),
        (0.3530,),
        _FMNIST_FILES,
        (tuple(f.filename for f in _FMNIST_FILES),),
        read_fashion_mnist,
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        (_CIFAR10_FILE,),
        _cifar_layouts("cifar10"),
        functools.partial(read_cifar, name="cifar10"),
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        (_CIFAR100_FILE,),
        _cifar_layouts("cifar100"),
        functools.partial(read_cifar, name="cifar100"),
    ),
    "svhn": DatasetSpec(
        "svhn",
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        _SVHN_FILES,
        (tuple(f.filename for f in _SVHN_FILES),),
        read_svhn,
    ),
}
"""The datasets :func:`load_dataset` knows, by name."""

DEFAULT_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    # Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts the four official files here.
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
"""System folders searched (after ``data_dir`` and ``$SB_DATA_DIR``) before the download cache."""

DATA_DIR_ENV = "SB_DATA_DIR"


def cache_dir() -> Path:
    """Where downloads go when no data folder is given: ``$XDG_CACHE_HOME/selective_backprop`` or
    ``~/.cache/selective_backprop``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selective_backprop"


def _not_found(spec: DatasetSpec, searched: list[Path]) -> FileNotFoundError:
    folders = "\n".join(f"  {p}" for p in searched)
    needed = " or ".join(" + ".join(layout) for layout in spec.layouts)
    ways = []
    if spec.name == "fashion-mnist":
        ways.append("install Debian's package: sudo apt-get install dataset-fashion-mnist")
    ways.append(f"download it: pass --download (download=True); files go to {cache_dir() / spec.name}")
    ways.append(f"or pass --data-dir (data_dir=..., or set ${DATA_DIR_ENV}) pointing at a folder with {needed}")
    lines = "\n".join(f"  - {w}" for w in ways)
    return FileNotFoundError(f"{spec.name} not found. Searched:\n{folders}\nTo get it:\n{lines}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: torch.device | str = "cpu",
    downloader: Downloader | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the train and test splits of a registered dataset onto ``device``.

    Folders are searched in this order, each as given and with ``/<name>`` appended: ``data_dir``, then
    ``$SB_DATA_DIR``, then the system folders in :data:`DEFAULT_DATA_DIRS` (Fashion-MNIST's Debian package),
    then the download cache (:func:`cache_dir` ``/<name>``). The first folder holding a complete copy wins.
    When none does and ``download`` is true, the official files are fetched and MD5-checked into ``data_dir``
    (or ``$SB_DATA_DIR``, or the cache).

    Args:
        name: one of :data:`DATASETS` (``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``).
        data_dir: folder holding the official files. Default: ``None``.
        download: fetch the files when they are not found. Default: ``False``.
        device: where the tensors go. Default: ``"cpu"``.
        downloader: ``downloader(url, dest, md5)``, for tests or mirrors. Default: :func:`download`.

    Returns:
        ``(train, test)`` datasets.

    Raises:
        ValueError: on an unknown name, or a corrupt file (the message names it).
        FileNotFoundError: when the data is in none of the folders searched and ``download`` is false; the
            message lists the folders and how to get the data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    roots = [Path(r).expanduser() for r in (data_dir, os.environ.get(DATA_DIR_ENV)) if r]
    candidates = [p for root in roots for p in (root, root / name)]
    candidates += [*DEFAULT_DATA_DIRS.get(name, ()), cache_dir() / name]
    folder = next((p for p in candidates if spec.present_in(p)), None)
    if folder is None and download:
        folder = roots[0] if roots else cache_dir() / name
        fetch = downloader or _download_file
        for remote in spec.files:
            if not (folder / remote.filename).exists():
                fetch(remote.url, folder / remote.filename, remote.md5)
        if not spec.present_in(folder):
            raise FileNotFoundError(f"{folder}: downloaded {name} but its files are still incomplete")
    if folder is None:
        raise _not_found(spec, candidates)
    (train_x, train_y), (test_x, test_y) = spec.reader(folder)
    train = ArrayDataset(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        spec.num_classes,
        spec.mean,
        spec.std,
        f"{name}-train",
    )
    test = ArrayDataset(
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        spec.num_classes,
        spec.mean,
        spec.std,
        f"{name}-test",
    )
    return train.to(device), test.to(device)


# ----------------------------------------------------------------------------------------------------------
# Label noise


def apply_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Randomize the labels of a seeded random subset, as in the paper's noisy-label experiment.

    Exactly ``round(fraction * N)`` examples are chosen (without replacement); each gets a label drawn
    uniformly from all ``num_classes`` classes. As in the paper, labels are *randomized*, not forced to
    change: about ``1 / num_classes`` of the chosen examples keep their true label by chance.

    Args:
        labels: 1-D integer labels; not modified.
        fraction: share of examples to randomize, in ``[0, 1]``.
        num_classes: labels are drawn from ``[0, num_classes)``.
        seed: seeds a private ``torch.Generator``; the global RNG is not touched.

    Returns:
        ``(noisy_labels, noisy_indices)``: a new label tensor, and the sorted int64 indices of the randomized
        examples, both on ``labels.device``.

    Raises:
        ValueError: when ``fraction`` is outside ``[0, 1]``, ``num_classes < 1`` or ``labels`` is not 1-D.

    Example:
        >>> labels = torch.arange(10)
        >>> noisy, idx = apply_label_noise(labels, 0.3, num_classes=10, seed=0)
        >>> len(idx), bool((noisy != labels).sum() <= 3), labels.tolist() == list(range(10))
        (3, True, True)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}; e.g. 0.1 randomizes 10% of labels")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    random_labels = torch.randint(0, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen.to(labels.device)] = random_labels.to(labels.device, labels.dtype)
    return noisy, chosen.sort().values.to(labels.device)


# ----------------------------------------------------------------------------------------------------------
# Batch augmentation on the device


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
    "svhn": Augment(crop_padding=4, cutout=20),
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
# Loader


class DeviceLoader:
    """Iterate an :class:`ArrayDataset` in batches of ``(inputs, targets, indices)`` on its device.

    Each epoch draws a permutation from the loader's own ``torch.Generator`` (on the dataset's device, seeded
    with ``seed``), so epochs differ, runs with the same seed are identical and the global RNG is never used.
    Augmentation draws from the same generator. ``state_dict()`` taken between epochs and restored with
    ``load_state_dict()`` reproduces the following epochs exactly.

    Args:
        dataset: the data, already on the training device.
        batch_size: examples per batch.
        shuffle: permute every epoch; otherwise dataset order. Default: ``True``.
        augment: training augmentation; ``None`` only normalizes. Default: ``None``.
        seed: generator seed. Default: ``0``.
        drop_last: skip the final batch when it is smaller than ``batch_size``. Default: ``False``.

    Yields:
        ``inputs`` float32 ``B x C x H x W`` (normalized, augmented), ``targets`` int64 ``B``, ``indices``
        int64 ``B`` (positions in ``dataset``).

    Raises:
        ValueError: when ``batch_size < 1``.

    Example:
        >>> ds = ArrayDataset(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
        ...                   num_classes=2, mean=(0.0,), std=(1.0,), name="toy")
        >>> loader = DeviceLoader(ds, batch_size=2)
        >>> len(loader), [len(idx) for _, _, idx in loader]
        (3, [2, 2, 1])
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool = True,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None else Augment()
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.generator = torch.Generator(device=dataset.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_order(self) -> Tensor:
        """This epoch's dataset indices, in visiting order (draws from the generator when shuffling)."""
        n, device = len(self.dataset), self.dataset.device
        return (
            torch.randperm(n, generator=self.generator, device=device)
            if self.shuffle
            else torch.arange(n, device=device)
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        ds, order = self.dataset, self._epoch_order()
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start : start + self.batch_size]
            inputs = self.augment.apply(ds.images[indices], ds.mean, ds.std, self.generator)
            yield inputs, ds.labels[indices], indices

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, epoch counter and generator state (not the dataset)."""
        return {
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "augment": dataclasses.asdict(self.augment),
            "seed": self.seed,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next epoch is the one the saved loader would run."""
        state = dict(state)
        self.generator.set_state(state.pop("generator").cpu())
        self.augment = Augment(**state.pop("augment"))
        self.__dict__.update(state)
