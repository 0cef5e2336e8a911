"""Which datasets exist, where their files are searched for, and how they are downloaded (MD5-checked)."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dataset import ArrayDataset, Split
from .readers import _CIFAR_LAYOUT, read_cifar, read_fashion_mnist, read_svhn

Downloader = Callable[[str, Path, str], None]


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
