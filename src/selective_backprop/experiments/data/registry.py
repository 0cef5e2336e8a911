"""Which datasets exist, where their files are searched for, and how they are downloaded (MD5-checked)."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..progress import shows_bar
from .dataset import ArrayDataset, Split
from .readers import _CIFAR_LAYOUT, read_cifar, read_fashion_mnist, read_svhn

Downloader = Callable[[str, Path, str], None]


def download(url: str, dest: str | os.PathLike[str], md5: str) -> None:
    """Download ``url`` to ``dest``, atomically, and only if its MD5 matches.

    The bytes go to a temporary file next to ``dest``, which is renamed onto ``dest`` (``os.replace``) after
    the checksum matches and deleted otherwise, so ``dest`` is either absent or complete and verified. Shows a
    tqdm progress bar when tqdm is installed and stderr is a terminal; otherwise prints one line to stderr.

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
            bar: Any = None
            if not shows_bar(True):  # a log, not a terminal: one line instead of a \r update per megabyte
                print(f"downloading {url} to {dest}", file=sys.stderr, flush=True)
            else:
                try:
                    from tqdm import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
                except ImportError:
                    pass
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
        folder: the subfolder name searched under a data folder and used in the download cache; default ``name``
            (``svhn-extra`` shares ``svhn``'s folder).
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: tuple[RemoteFile, ...]
    layouts: tuple[tuple[str, ...], ...]
    reader: Callable[[Path], tuple[Split, Split]]
    folder: str = ""

    def __post_init__(self) -> None:
        if not self.folder:
            object.__setattr__(self, "folder", self.name)

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
_SVHN_EXTRA = RemoteFile("http://ufldl.stanford.edu/housenumbers/extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")


def _cifar_layouts(name: str) -> tuple[tuple[str, ...], ...]:
    tarball, top, train, test, *_ = _CIFAR_LAYOUT[name]
    return (tarball,), (top,), train + test


def _svhn(name: str, files: tuple[RemoteFile, ...], reader: Callable[[Path], tuple[Split, Split]]) -> DatasetSpec:
    """SVHN's spec (training-set mean and std of the train split); both variants live in the ``svhn`` folder."""
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    return DatasetSpec(name, 10, mean, std, files, (tuple(f.filename for f in files),), reader, folder="svhn")


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
    "svhn": _svhn("svhn", _SVHN_FILES, read_svhn),
    # SVHN with the 531,131 "extra" images added to the training set (604,388 in all), as the paper's SVHN setup.
    "svhn-extra": _svhn("svhn-extra", (*_SVHN_FILES, _SVHN_EXTRA), functools.partial(read_svhn, extra=True)),
}
"""The datasets :func:`load_dataset` knows, by name."""

DEFAULT_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    # Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts the four official files here.
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
"""System folders searched before the download cache when no folder is named (``data_dir``, ``$SB_DATA_DIR``)."""

DATA_DIR_ENV = "SB_DATA_DIR"


def cache_dir() -> Path:
    """Where downloads go when no data folder is given: ``$XDG_CACHE_HOME/selective_backprop`` or
    ``~/.cache/selective_backprop``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selective_backprop"


def _needed(spec: DatasetSpec) -> str:
    return " or ".join(" + ".join(layout) for layout in spec.layouts)


def _not_found(spec: DatasetSpec, searched: list[Path]) -> FileNotFoundError:
    folders = "\n".join(f"  {p}" for p in searched)
    ways = []
    if spec.name == "fashion-mnist":
        ways.append("install Debian's package: sudo apt-get install dataset-fashion-mnist")
    ways.append(f"download it: pass --download (download=True); files go to {cache_dir() / spec.folder}")
    ways.append(f"or pass --data-dir (data_dir=..., or set ${DATA_DIR_ENV}) pointing at a folder with {_needed(spec)}")
    lines = "\n".join(f"  - {w}" for w in ways)
    return FileNotFoundError(f"{spec.name} not found. Searched:\n{folders}\nTo get it:\n{lines}")


def _missing(spec: DatasetSpec, folder: Path) -> list[str]:
    """The names of the most complete layout that ``folder`` lacks."""
    return min(([n for n in layout if not (folder / n).exists()] for layout in spec.layouts), key=len)


def _not_in_named(spec: DatasetSpec, root: Path, named_by: str) -> FileNotFoundError:
    """The data is not in the folder the user named (``--data-dir`` or ``$SB_DATA_DIR``): say what is missing."""
    if not root.is_dir():
        problem = f"{named_by} {root} does not exist"
    else:
        closest = min((root, root / spec.folder), key=lambda folder: len(_missing(spec, folder)))
        problem = f"{named_by} {root} does not hold {spec.name}: {closest} lacks {', '.join(_missing(spec, closest))}"
    ways = [f"pass --download (download=True) to download the official files into {root} (MD5-checked)"]
    if spec.name == "fashion-mnist":
        ways.append(f"or sudo apt-get install dataset-fashion-mnist and use {named_by} "
                    f"{DEFAULT_DATA_DIRS['fashion-mnist'][0]}")  # fmt: skip
    default = "unset $" + DATA_DIR_ENV if named_by.startswith("$") else "leave out --data-dir (data_dir=None)"
    ways.append(f"or {default} to search the default folders and the download cache")
    lines = "\n".join(f"  - {w}" for w in ways)
    return FileNotFoundError(f"{problem}. {spec.name} needs {_needed(spec)} in that folder or in its "
                             f"{spec.folder}/ subfolder. To get them:\n{lines}")  # fmt: skip


def _named_root(data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """The folder the user named explicitly (``data_dir``, else ``$SB_DATA_DIR``) and how they named it."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get(DATA_DIR_ENV)
    return (Path(env).expanduser(), f"${DATA_DIR_ENV}") if env else (None, "")


def locate_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> Path | None:
    """The folder :func:`load_dataset` would read ``name`` from, without reading it; ``None`` when it would have
    to download it first (``download`` true). Cheap: checks file names only, so a run can refuse a missing
    dataset before it makes its folder.

    A folder named explicitly is the only place searched: ``data_dir`` (``--data-dir``), else ``$SB_DATA_DIR``,
    each as given and with ``/<name>`` appended. Only when neither is given are the system folders in
    :data:`DEFAULT_DATA_DIRS` (Fashion-MNIST's Debian package) and the download cache (:func:`cache_dir`
    ``/<name>``) searched. The first folder holding a complete copy wins.

    Raises:
        ValueError: on an unknown name.
        FileNotFoundError: when the data is not there and ``download`` is false: for a named folder, the message
            names it, says whether it exists and which files it lacks, and how to get them (``--download`` fills
            it); otherwise it lists the folders searched.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root, named_by = _named_root(data_dir)
    sub = spec.folder
    candidates = [root, root / sub] if root is not None else [*DEFAULT_DATA_DIRS.get(name, ()), cache_dir() / sub]
    folder = next((p for p in candidates if spec.present_in(p)), None)
    if folder is not None or download:
        return folder
    raise _not_found(spec, candidates) if root is None else _not_in_named(spec, root, named_by)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: torch.device | str = "cpu",
    downloader: Downloader | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the train and test splits of a registered dataset onto ``device``.

    Where the files are searched: see :func:`locate_dataset` (a folder named with ``data_dir`` or
    ``$SB_DATA_DIR`` is the only one searched; it never falls back to another copy). When the data is not
    found and ``download`` is true, the official files are fetched and MD5-checked into ``data_dir`` (or
    ``$SB_DATA_DIR``, or the cache), creating the folder if needed.

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
        FileNotFoundError: when the data is not found and ``download`` is false (see :func:`locate_dataset`).
    """
    folder = locate_dataset(name, data_dir, download)  # raises on an unknown name, or missing data without download
    spec = DATASETS[name]
    if folder is None:
        root, _ = _named_root(data_dir)
        folder = root if root is not None else cache_dir() / spec.folder
        fetch = downloader or _download_file
        for remote in spec.files:
            if not (folder / remote.filename).exists():
                fetch(remote.url, folder / remote.filename, remote.md5)
        if not spec.present_in(folder):
            raise FileNotFoundError(f"{folder}: downloaded {name} but its files are still incomplete")
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
