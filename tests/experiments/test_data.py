"""Tests for selective_backprop.experiments.data: format readers on tiny files, loading, label noise, augmentation."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import selective_backprop.experiments.data as data_mod
from selective_backprop.experiments.data import (
    DATASETS,
    ArrayDataset,
    Augment,
    DeviceLoader,
    apply_label_noise,
    cutout,
    default_augment,
    download,
    load_dataset,
    normalize,
    random_crop,
    random_flip,
    read_cifar,
    read_fashion_mnist,
    read_idx,
    read_svhn,
)

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------------------------
# Writers of tiny files in the official formats


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """IDX: magic 00 00 <type> <ndim>, big-endian uint32 dims, big-endian payload; gzipped if ``.gz``."""
    big_endian = {0x08: ">u1", 0x0C: ">i4"}[type_code]
    raw = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(big_endian).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_fashion_mnist(folder: Path, seed: int = 0, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}_x"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}_y"] = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", arrays[f"{prefix}_x"])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", arrays[f"{prefix}_y"])
    return arrays


CIFAR = {
    # name: (tarball, top folder, train members, test members, label key, classes)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def cifar_batches(name: str, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """member -> (images N x 3 x 32 x 32, labels); 2 examples per training batch, 3 in the test batch."""
    rng = np.random.default_rng(seed)
    _, _, train, test, _, classes = CIFAR[name]
    sizes = {m: 2 for m in train} | {m: 3 for m in test}
    return {
        m: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n).tolist())
        for m, n in sizes.items()
    }


def cifar_pickle(name: str, images: np.ndarray, labels: list[int]) -> bytes:
    # As the official files: protocol 2, bytes keys, rows of 1024 R then 1024 G then 1024 B values.
    label_key = CIFAR[name][4]
    batch = {b"batch_label": b"tiny", b"data": images.reshape(len(images), 3072), label_key: labels}
    if name == "cifar100":
        batch[b"coarse_labels"] = [0] * len(labels)
    return pickle.dumps(batch, protocol=2)


def write_cifar(folder: Path, name: str, seed: int = 0, corrupt: str | None = None) -> dict:
    """Write the official tarball; ``corrupt`` names a member whose content is replaced by garbage."""
    tarball, top, *_ = CIFAR[name]
    batches = cifar_batches(name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / tarball, "w:gz") as tar:
        for member, (images, labels) in batches.items():
            payload = b"not a pickle" if member == corrupt else cifar_pickle(name, images, labels)
            add_member(tar, f"{top}/{member}", payload)
    return batches


def expected_cifar(name: str, batches: dict) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    _, _, train, test, *_ = CIFAR[name]
    return tuple(
        (np.concatenate([batches[m][0] for m in part]), np.array(sum((batches[m][1] for m in part), [])))
        for part in (train, test)
    )


def write_svhn(folder: Path, seed: int = 0, extra: bool = False) -> dict[str, np.ndarray]:
    import scipy.io

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", 5), ("test", 3), *((("extra", 4),) if extra else ())):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, *rng.integers(1, 11, n - 1)], dtype=np.uint8)[:, None]  # the first is a digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    return arrays


WRITERS = {
    "fashion-mnist": write_fashion_mnist,
    "cifar10": lambda folder, seed=0: write_cifar(folder, "cifar10", seed),
    "cifar100": lambda folder, seed=0: write_cifar(folder, "cifar100", seed),
    "svhn": write_svhn,
    "svhn-extra": lambda folder, seed=0: write_svhn(folder, seed, extra=True),
}


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $SB_DATA_DIR, no system folder, and a private download cache: only what a test writes is found."""
    monkeypatch.delenv("SB_DATA_DIR", raising=False)
    monkeypatch.setitem(data_mod.DEFAULT_DATA_DIRS, "fashion-mnist", (tmp_path / "system",))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


# ----------------------------------------------------------------------------------------------------------
# ArrayDataset


def tiny_dataset(n: int = 23, channels: int = 3, size: int = 4, classes: int = 5) -> ArrayDataset:
    images = (torch.arange(n * channels * size * size) % 251).to(torch.uint8).view(n, channels, size, size)
    return ArrayDataset(images, torch.arange(n) % classes, classes, (0.5,) * channels, (0.25,) * channels, "tiny")


class TestArrayDataset:
    @pytest.mark.parametrize(
        ("images", "labels", "classes", "match"),
        [
            (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 2, "uint8"),
            (torch.zeros(2, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 2, "N x C x H x W"),
            (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), 2, "int64"),
            (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 2, "3 labels"),
            (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 2]), 2, r"\[0, 2\]"),
            (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([-1, 0]), 2, "num_classes"),
        ],
    )
    def test_validation(self, images, labels, classes, match):
        with pytest.raises(ValueError, match=match):
            ArrayDataset(images, labels, classes, (0.5,), (0.5,), "bad")

    def test_mean_std_per_channel(self):
        with pytest.raises(ValueError, match="per channel"):
            ArrayDataset(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 2,
                         (0.5,), (0.5,), "bad")  # fmt: skip

    def test_len_and_to_returns_new_dataset(self):
        ds = tiny_dataset()
        moved = ds.to("cpu")
        assert len(ds) == 23 and moved is not ds
        assert torch.equal(moved.images, ds.images) and moved.name == ds.name and moved.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------------
# Readers


class TestReadIdx:
    @pytest.mark.parametrize("suffix", [".gz", ""])
    def test_round_trip_uint8(self, tmp_path, suffix):
        array = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
        out = read_idx(write_idx(tmp_path / f"x-idx3-ubyte{suffix}", array))
        assert out.dtype == np.uint8 and out.shape == (3, 5, 7)
        np.testing.assert_array_equal(out, array)

    def test_big_endian_int32(self, tmp_path):
        array = np.array([[1, -2], [70000, 3]], dtype=np.int32)
        out = read_idx(write_idx(tmp_path / "x.gz", array, type_code=0x0C))
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, array)

    def test_truncated_gzip(self, tmp_path):
        path = write_idx(tmp_path / "x.gz", np.zeros((50, 50), np.uint8) + 7)
        path.write_bytes(path.read_bytes()[:-15])
        with pytest.raises(ValueError, match="gunzip") as info:
            read_idx(path)
        assert str(path) in str(info.value)

    def test_not_gzip(self, tmp_path):
        path = tmp_path / "x.gz"
        path.write_bytes(b"plain bytes, no gzip header")
        with pytest.raises(ValueError) as info:
            read_idx(path)
        assert str(path) in str(info.value)

    @pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00", b""])
    def test_wrong_magic(self, tmp_path, header):
        path = tmp_path / "x.gz"
        path.write_bytes(gzip.compress(header + struct.pack(">I", 2) + b"ab"))
        with pytest.raises(ValueError, match="magic") as info:
            read_idx(path)
        assert str(path) in str(info.value)

    @pytest.mark.parametrize("delta", [-1, 1])
    def test_wrong_length(self, tmp_path, delta):
        path = tmp_path / "x.gz"
        payload = bytes(6 + delta)
        path.write_bytes(gzip.compress(struct.pack(">BBBBII", 0, 0, 8, 2, 2, 3) + payload))
        with pytest.raises(ValueError, match="bytes") as info:
            read_idx(path)
        assert str(path) in str(info.value)

    def test_truncated_header(self, tmp_path):
        path = tmp_path / "x"
        path.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 3, 5))
        with pytest.raises(ValueError, match="header") as info:
            read_idx(path)
        assert str(path) in str(info.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            read_idx(tmp_path / "nope.gz")


class TestFashionMnist:
    def test_exact_arrays(self, tmp_path):
        arrays = write_fashion_mnist(tmp_path)
        (train_x, train_y), (test_x, test_y) = read_fashion_mnist(tmp_path)
        assert train_x.shape == (6, 1, 28, 28) and test_x.shape == (4, 1, 28, 28)
        assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
        np.testing.assert_array_equal(train_x[:, 0], arrays["train_x"])
        np.testing.assert_array_equal(test_x[:, 0], arrays["t10k_x"])
        np.testing.assert_array_equal(train_y, arrays["train_y"])
        np.testing.assert_array_equal(test_y, arrays["t10k_y"])

    def test_count_mismatch_names_file(self, tmp_path):
        write_fashion_mnist(tmp_path)
        path = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
        with pytest.raises(ValueError, match="3 labels for 4 images") as info:
            read_fashion_mnist(tmp_path)
        assert str(path) in str(info.value)

    def test_label_out_of_range_names_file(self, tmp_path):
        write_fashion_mnist(tmp_path)
        path = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 10], np.uint8))
        with pytest.raises(ValueError, match="labels span") as info:
            read_fashion_mnist(tmp_path)
        assert str(path) in str(info.value)


class TestCifar:
    @pytest.mark.parametrize("name", ["cifar10", "cifar100"])
    def test_tarball_exact_arrays(self, tmp_path, name):
        expected = expected_cifar(name, write_cifar(tmp_path, name))
        splits = read_cifar(tmp_path, name)
        for (x, y), (ex, ey) in zip(splits, expected, strict=True):
            assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == np.int64
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)
        assert len(splits[0][0]) == (10 if name == "cifar10" else 2) and len(splits[1][0]) == 3

    def test_channel_layout(self, tmp_path):
        # One pixel of each plane: index 0 is red (0,0), 1024 green (0,0), 3071 blue (31,31).
        row = np.zeros((1, 3072), np.uint8)
        row[0, [0, 1024, 3071]] = [11, 22, 33]
        (tmp_path / "cifar-10-batches-py").mkdir()
        for member in CIFAR["cifar10"][2] + CIFAR["cifar10"][3]:
            batch = {b"data": row, b"labels": [4]}
            (tmp_path / "cifar-10-batches-py" / member).write_bytes(pickle.dumps(batch, protocol=2))
        (x, _), _ = read_cifar(tmp_path, "cifar10")
        assert (x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 31, 31]) == (11, 22, 33) and x[0].sum() == 66

    @pytest.mark.parametrize("name", ["cifar10", "cifar100"])
    @pytest.mark.parametrize("inside", [True, False])
    def test_extracted_folder(self, tmp_path, name, inside):
        expected = expected_cifar(name, write_cifar(tmp_path / "src", name))
        with tarfile.open(tmp_path / "src" / CIFAR[name][0]) as tar:
            tar.extractall(tmp_path / "out", filter="data")
        folder = tmp_path / "out" / CIFAR[name][1] if inside else tmp_path / "out"
        splits = read_cifar(folder, name)
        for (x, y), (ex, ey) in zip(splits, expected, strict=True):
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)

    @pytest.mark.parametrize(("name", "member"), [("cifar10", "data_batch_3"), ("cifar100", "test")])
    def test_corrupt_member_names_file(self, tmp_path, name, member):
        write_cifar(tmp_path, name, corrupt=member)
        with pytest.raises(ValueError, match="unpickle") as info:
            read_cifar(tmp_path, name)
        assert str(tmp_path / CIFAR[name][0]) in str(info.value) and member in str(info.value)

    def test_truncated_tarball_names_file(self, tmp_path):
        write_cifar(tmp_path, "cifar10")
        path = tmp_path / CIFAR["cifar10"][0]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ValueError, match="tarball") as info:
            read_cifar(tmp_path, "cifar10")
        assert str(path) in str(info.value)

    def test_missing_member_names_file(self, tmp_path):
        batches = cifar_batches("cifar10")
        path = tmp_path / CIFAR["cifar10"][0]
        with tarfile.open(path, "w:gz") as tar:
            add_member(tar, "cifar-10-batches-py/data_batch_1", cifar_pickle("cifar10", *batches["data_batch_1"]))
        with pytest.raises(ValueError, match="missing members") as info:
            read_cifar(tmp_path, "cifar10")
        assert str(path) in str(info.value) and "test_batch" in str(info.value)

    def test_wrong_data_shape_names_file(self, tmp_path):
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        for member in ("train", "test"):
            batch = {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}
            (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
        with pytest.raises(ValueError, match="3072") as info:
            read_cifar(tmp_path, "cifar100")
        assert str(folder / "train") in str(info.value)

    def test_refuses_code_in_pickle(self, tmp_path):
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        for member in ("train", "test"):
            (folder / member).write_bytes(pickle.dumps({b"data": print}, protocol=2))
        with pytest.raises(ValueError, match="refusing"):
            read_cifar(tmp_path, "cifar100")

    def test_nothing_there(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
            read_cifar(tmp_path, "cifar10")


class TestSvhn:
    def test_exact_arrays_and_zero_label(self, tmp_path):
        arrays = write_svhn(tmp_path)
        splits = read_svhn(tmp_path)
        for (x, y), split in zip(splits, ("train", "test"), strict=True):
            raw_x, raw_y = arrays[f"{split}_x"], arrays[f"{split}_y"][:, 0]
            assert x.shape == (raw_x.shape[3], 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
            for n in range(len(x)):  # explicit reference: X[h, w, c, n] -> x[n, c, h, w]
                for c in range(3):
                    np.testing.assert_array_equal(x[n, c], raw_x[:, :, c, n])
            np.testing.assert_array_equal(y, [0 if v == 10 else v for v in raw_y])
            assert y[0] == 0 and y.max() <= 9

    def test_the_extra_split_follows_the_training_images(self, tmp_path):
        arrays = write_svhn(tmp_path, extra=True)
        (x, y), (tx, _) = read_svhn(tmp_path, extra=True)
        (plain_x, plain_y), _ = read_svhn(tmp_path)
        assert len(x) == 5 + 4 and len(tx) == 3 and np.array_equal(x[:5], plain_x) and np.array_equal(y[:5], plain_y)
        np.testing.assert_array_equal(x[5:], arrays["extra_x"].transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(y[5:], [0 if v == 10 else v for v in arrays["extra_y"][:, 0]])

    def test_the_extra_split_shares_the_svhn_folder_and_names_its_missing_file(self, isolated):
        write_svhn(isolated / "root" / "svhn")  # no extra_32x32.mat
        with pytest.raises(FileNotFoundError, match=r"svhn lacks extra_32x32\.mat") as info:
            load_dataset("svhn-extra", data_dir=isolated / "root")
        assert "--download" in str(info.value)
        write_svhn(isolated / "root" / "svhn", extra=True)
        train, _ = load_dataset("svhn-extra", data_dir=isolated / "root")
        assert len(train) == 9 and len(load_dataset("svhn", data_dir=isolated / "root")[0]) == 5

    def test_corrupt_names_file(self, tmp_path):
        write_svhn(tmp_path)
        path = tmp_path / "test_32x32.mat"
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(ValueError) as info:
            read_svhn(tmp_path)
        assert str(path) in str(info.value)

    def test_wrong_variables_names_file(self, tmp_path):
        import scipy.io

        write_svhn(tmp_path)
        path = tmp_path / "train_32x32.mat"
        scipy.io.savemat(path, {"images": np.zeros((2, 2), np.uint8)})
        with pytest.raises(ValueError, match="'X'") as info:
            read_svhn(tmp_path)
        assert str(path) in str(info.value)

    def test_missing_scipy_message(self, tmp_path, monkeypatch):
        write_svhn(tmp_path)
        monkeypatch.setitem(sys.modules, "scipy.io", None)
        with pytest.raises(ImportError, match=r"pip install 'selective-backprop\[experiments\]'"):
            read_svhn(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Download and load_dataset


class TestDownload:
    def test_file_url_with_right_md5(self, tmp_path):
        source = tmp_path / "source.bin"
        source.write_bytes(b"x" * 5000)
        dest = tmp_path / "sub" / "dest.bin"
        download(source.as_uri(), dest, hashlib.md5(source.read_bytes()).hexdigest())
        assert dest.read_bytes() == source.read_bytes()
        assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.bin"]

    def test_works_without_tqdm(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "tqdm", None)
        source = tmp_path / "source.bin"
        source.write_bytes(b"abc")
        download(source.as_uri(), tmp_path / "dest.bin", hashlib.md5(b"abc").hexdigest())
        assert (tmp_path / "dest.bin").read_bytes() == b"abc"

    def test_wrong_md5_leaves_nothing(self, tmp_path):
        source = tmp_path / "source.bin"
        source.write_bytes(b"payload")
        dest = tmp_path / "sub" / "dest.bin"
        with pytest.raises(ValueError, match="MD5"):
            download(source.as_uri(), dest, "0" * 32)
        assert list(dest.parent.iterdir()) == []

    def test_unreachable_url_leaves_nothing(self, tmp_path):
        dest = tmp_path / "sub" / "dest.bin"
        with pytest.raises(OSError):
            download((tmp_path / "missing.bin").as_uri(), dest, "0" * 32)
        assert list(dest.parent.iterdir()) == []

    def test_registry_files(self):
        assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100", "svhn", "svhn-extra"}
        for spec in DATASETS.values():
            names = [f.filename for f in spec.files]
            assert any(set(layout) <= set(names) for layout in spec.layouts), spec.name
            assert all(len(f.md5) == 32 and int(f.md5, 16) >= 0 for f in spec.files)
            assert all(f.url.startswith(("http://", "https://")) for f in spec.files)
        assert DATASETS["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"


def mirror_downloader(mirror: Path, calls: list):
    """A downloader that copies from a local folder through the real download() (file:// URLs)."""

    def fetch(url: str, dest: Path, md5: str) -> None:
        calls.append((url, dest, md5))
        source = mirror / url.rsplit("/", 1)[-1]
        download(source.as_uri(), dest, hashlib.md5(source.read_bytes()).hexdigest())

    return fetch


class TestLoadDataset:
    @pytest.mark.parametrize("name", sorted(WRITERS))
    def test_from_data_dir(self, isolated, name):
        WRITERS[name](isolated / "d")
        train, test = load_dataset(name, data_dir=isolated / "d")
        spec = DATASETS[name]
        expected = spec.reader(isolated / "d")
        for ds, (x, y), split in zip((train, test), expected, ("train", "test"), strict=True):
            assert ds.name == f"{name}-{split}" and ds.num_classes == spec.num_classes
            assert ds.mean == spec.mean and ds.std == spec.std
            assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
            assert torch.equal(ds.images, torch.from_numpy(x)) and torch.equal(ds.labels, torch.from_numpy(y))
            assert len(ds.mean) == ds.images.shape[1]

    def test_env_var_with_per_dataset_subfolder(self, isolated, monkeypatch):
        arrays = write_fashion_mnist(isolated / "root" / "fashion-mnist", seed=1)
        monkeypatch.setenv("SB_DATA_DIR", str(isolated / "root"))
        train, _ = load_dataset("fashion-mnist")
        assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train_x"]))

    def test_data_dir_wins_over_env_var(self, isolated, monkeypatch):
        write_fashion_mnist(isolated / "env", seed=1)
        arrays = write_fashion_mnist(isolated / "arg", seed=2)
        monkeypatch.setenv("SB_DATA_DIR", str(isolated / "env"))
        train, _ = load_dataset("fashion-mnist", data_dir=isolated / "arg")
        assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train_x"]))

    def test_system_folder(self, isolated):
        arrays = write_fashion_mnist(isolated / "system", seed=3)
        train, _ = load_dataset("fashion-mnist")
        assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train_x"]))

    def test_missing_fashion_mnist_explains_both_ways(self, isolated):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("fashion-mnist")
        message = str(info.value)
        assert "sudo apt-get install dataset-fashion-mnist" in message and "--download" in message
        for folder in (isolated / "system", isolated / "cache" / "selective_backprop" / "fashion-mnist"):
            assert str(folder) in message

    @pytest.mark.parametrize("how", ["argument", "env"])
    def test_a_named_folder_that_does_not_exist_is_refused_not_replaced(self, isolated, monkeypatch, how):
        write_fashion_mnist(isolated / "system")  # another copy is there: it must not be used instead
        write_fashion_mnist(isolated / "cache" / "selective_backprop" / "fashion-mnist")
        missing = isolated / "no" / "such" / "folder"
        if how == "env":
            monkeypatch.setenv("SB_DATA_DIR", str(missing))
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("fashion-mnist", data_dir=missing if how == "argument" else None)
        message = str(info.value)
        named = "--data-dir" if how == "argument" else "$SB_DATA_DIR"
        assert message.startswith(f"{named} {missing} does not exist.")
        assert "train-images-idx3-ubyte.gz + train-labels-idx1-ubyte.gz" in message
        assert f"--download (download=True) to download the official files into {missing}" in message
        assert str(isolated / "system") not in message.split("To get them")[0]

    def test_a_named_folder_without_the_files_says_which_are_missing(self, isolated):
        write_fashion_mnist(isolated / "system")
        write_fashion_mnist(isolated / "d")
        (isolated / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("fashion-mnist", data_dir=isolated / "d")
        assert str(info.value).startswith(f"--data-dir {isolated / 'd'} does not hold fashion-mnist: "
                                          f"{isolated / 'd'} lacks t10k-labels-idx1-ubyte.gz.")  # fmt: skip
        (isolated / "e").mkdir()
        with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
            load_dataset("cifar10", data_dir=isolated / "e")
        assert "does not hold cifar10" in str(info.value) and "apt-get" not in str(info.value)

    def test_missing_cifar_explains_both_ways(self, isolated):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset("cifar10")
        message = str(info.value)
        assert "--download" in message and "--data-dir" in message and "cifar-10-python.tar.gz" in message
        assert "apt-get" not in message

    def test_partial_folder_is_not_found(self, isolated):
        write_fashion_mnist(isolated / "d")
        (isolated / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(FileNotFoundError):
            load_dataset("fashion-mnist", data_dir=isolated / "d")

    def test_unknown_name_lists_known(self):
        with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100, svhn"):
            load_dataset("mnist")

    def test_download_to_cache_then_found_without_download(self, isolated):
        expected = expected_cifar("cifar100", write_cifar(isolated / "mirror", "cifar100"))
        calls: list = []
        train, test = load_dataset("cifar100", download=True, downloader=mirror_downloader(isolated / "mirror", calls))
        spec_file = DATASETS["cifar100"].files[0]
        cached = isolated / "cache" / "selective_backprop" / "cifar100" / "cifar-100-python.tar.gz"
        assert calls == [(spec_file.url, cached, spec_file.md5)] and cached.is_file()
        assert torch.equal(test.images, torch.from_numpy(expected[1][0]))
        again, _ = load_dataset("cifar100")  # found in the cache: no download asked for
        assert torch.equal(again.images, train.images)

    def test_download_into_data_dir(self, isolated):
        write_fashion_mnist(isolated / "system")  # a copy elsewhere does not stop the download into data_dir
        write_fashion_mnist(isolated / "mirror")
        calls: list = []
        load_dataset(
            "fashion-mnist",
            isolated / "d",
            download=True,
            downloader=mirror_downloader(isolated / "mirror", calls),
        )
        assert [c[1] for c in calls] == [isolated / "d" / f.filename for f in DATASETS["fashion-mnist"].files]
        assert [c[2] for c in calls] == [f.md5 for f in DATASETS["fashion-mnist"].files]
        assert load_dataset("fashion-mnist", isolated / "d")[0].images.shape == (6, 1, 28, 28)  # now found there

    def test_corrupt_file_propagates_path(self, isolated):
        write_fashion_mnist(isolated / "d")
        path = isolated / "d" / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(ValueError) as info:
            load_dataset("fashion-mnist", isolated / "d")
        assert str(path) in str(info.value)

    @pytest.mark.skipif(not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no system copy")
    def test_real_fashion_mnist(self):
        train, test = load_dataset("fashion-mnist", data_dir=SYSTEM_FMNIST)
        assert (len(train), len(test)) == (60000, 10000)
        assert train.images.shape[1:] == (1, 28, 28) and train.num_classes == 10
        assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))


# ----------------------------------------------------------------------------------------------------------
# Label noise


class TestLabelNoise:
    def test_exact_count_and_untouched_rest(self):
        labels = torch.arange(200) % 10
        original = labels.clone()
        noisy, idx = apply_label_noise(labels, 0.25, 10, seed=0)
        assert torch.equal(labels, original)  # input unchanged
        assert idx.dtype == torch.int64 and len(idx) == 50
        assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 50
        rest = torch.ones(200, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(noisy[rest], labels[rest])
        assert noisy.min() >= 0 and noisy.max() < 10 and noisy.dtype == labels.dtype

    @pytest.mark.parametrize(("n", "fraction", "count"), [(10, 0.26, 3), (10, 0.0, 0), (10, 1.0, 10), (7, 0.5, 4)])
    def test_count_is_rounded(self, n, fraction, count):
        _, idx = apply_label_noise(torch.zeros(n, dtype=torch.long), fraction, 3, seed=1)
        assert len(idx) == count

    def test_seeded(self):
        labels = torch.arange(100) % 10
        first, second = apply_label_noise(labels, 0.3, 10, 5), apply_label_noise(labels, 0.3, 10, 5)
        other = apply_label_noise(labels, 0.3, 10, 6)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        assert not torch.equal(first[1], other[1])

    def test_labels_are_randomized_uniformly(self):
        # Uniform over 10 classes: ~1/10 of the chosen keep their label; Binomial(10000, 0.1) has sd 30: 6 sd.
        labels = torch.arange(10000) % 10
        noisy, _ = apply_label_noise(labels, 1.0, 10, seed=0)
        assert 1000 - 180 <= int((noisy == labels).sum()) <= 1000 + 180
        counts = noisy.bincount(minlength=10)
        assert counts.min() >= 1000 - 180 and counts.max() <= 1000 + 180

    @pytest.mark.parametrize("fraction", [-0.1, 1.5])
    def test_bad_fraction(self, fraction):
        with pytest.raises(ValueError, match="fraction"):
            apply_label_noise(torch.zeros(4, dtype=torch.long), fraction, 2, 0)


# ----------------------------------------------------------------------------------------------------------
# Augmentation


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return (torch.arange(n * 3 * 8 * 8) % 200 + 1).to(dtype).view(n, 3, 8, 8)  # no zero pixels


class TestAugmentation:
    @pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
    @pytest.mark.parametrize(
        "op",
        [lambda x, g: random_crop(x, 2, g), random_flip, lambda x, g: cutout(x, 3, g)],
        ids=["crop", "flip", "cutout"],
    )
    def test_shape_dtype_and_reproducible(self, op, dtype):
        x = batch(dtype=dtype)
        out = op(x, gen(1))
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.equal(out, op(x, gen(1)))
        assert not torch.equal(out, op(x, gen(2)))

    def test_zero_sizes_are_identity_and_draw_nothing(self):
        x, g = batch(), gen()
        state = g.get_state()
        assert torch.equal(random_crop(x, 0, g), x) and torch.equal(cutout(x, 0, g), x)
        assert torch.equal(g.get_state(), state)

    def test_crop_matches_per_example_reference(self):
        x, padding = batch(), 2
        out = random_crop(x, padding, gen(3))
        replay = gen(3)  # documented draw order: row offsets, then column offsets
        dy = torch.randint(0, 2 * padding + 1, (len(x),), generator=replay)
        dx = torch.randint(0, 2 * padding + 1, (len(x),), generator=replay)
        assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 1
        for i in range(len(x)):
            padded = F.pad(x[i], (padding,) * 4)
            assert torch.equal(out[i], padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])

    def test_flip_matches_coins(self):
        x = batch(32)
        out = random_flip(x, gen(4))
        coins = torch.rand(32, generator=gen(4)) < 0.5
        assert 0 < int(coins.sum()) < 32
        for i in range(32):
            assert torch.equal(out[i], x[i].flip(-1) if coins[i] else x[i])

    @pytest.mark.parametrize("length", [4, 5])
    def test_cutout_matches_reference_and_interior_count(self, length):
        x = batch(64, torch.float32)
        out = cutout(x, length, gen(5))
        replay = gen(5)
        cy, cx = torch.randint(0, 8, (64,), generator=replay), torch.randint(0, 8, (64,), generator=replay)
        interior = 0
        for i in range(64):
            top, left = int(cy[i]) - length // 2, int(cx[i]) - length // 2
            expected = x[i].clone()
            expected[:, max(top, 0) : max(top + length, 0), max(left, 0) : max(left + length, 0)] = 0
            assert torch.equal(out[i], expected)
            zeros = int((out[i] == 0).sum())
            assert zeros <= 3 * length * length
            if top >= 0 and left >= 0 and top + length <= 8 and left + length <= 8:
                interior += 1
                assert zeros == 3 * length * length
        assert interior > 0

    def test_normalize(self):
        x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
        out = normalize(x, (0.0, 0.1, 0.5), (1.0, 0.2, 0.25))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.5, 2.0]))
        with pytest.raises(ValueError, match="per channel"):
            normalize(x, (0.5,), (0.5,))

    def test_augment_defaults(self):
        assert default_augment("cifar10") == Augment(crop_padding=4, flip=True, cutout=16)
        assert default_augment("cifar100") == Augment(crop_padding=4, flip=True, cutout=8)
        assert default_augment("svhn") == Augment(crop_padding=0, flip=False, cutout=20)  # cutout only, no crop
        assert default_augment("svhn-extra") == default_augment("svhn")
        assert default_augment("fashion-mnist") == Augment()
        assert set(DATASETS) <= {"cifar10", "cifar100", "svhn", "svhn-extra", "fashion-mnist"}
        with pytest.raises(ValueError, match="known"):
            default_augment("imagenet")
        with pytest.raises(ValueError, match=">= 0"):
            Augment(cutout=-1)

    def test_augment_apply_order(self):
        # Cutout comes after normalization: its zeros are the mean color, not black pixels.
        x = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
        out = Augment(cutout=4).apply(x, (0.5,), (0.5,), gen())
        assert set(out.unique().tolist()) == {0.0, 1.0}

    def test_global_rng_untouched(self):
        before = torch.get_rng_state()
        x = batch()
        Augment(crop_padding=2, flip=True, cutout=3).apply(x, (0.5,) * 3, (0.5,) * 3, gen())
        apply_label_noise(torch.zeros(10, dtype=torch.long), 0.5, 3, 0)
        for _ in DeviceLoader(tiny_dataset(), 8, augment=Augment(2, True, 2)):
            pass
        assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------------------
# DeviceLoader


def epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader)


def same_epochs(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(u, v) for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True)
    )


class TestDeviceLoader:
    def test_every_index_once_and_batch_sizes(self):
        loader = DeviceLoader(tiny_dataset(), batch_size=8)
        batches = epoch(loader)
        assert len(loader) == 3 and [len(b[2]) for b in batches] == [8, 8, 7]
        assert torch.equal(torch.cat([b[2] for b in batches]).sort().values, torch.arange(23))
        inputs, targets, indices = batches[0]
        assert (inputs.dtype, targets.dtype, indices.dtype) == (torch.float32, torch.int64, torch.int64)
        assert inputs.shape == (8, 3, 4, 4)

    def test_drop_last(self):
        loader = DeviceLoader(tiny_dataset(), batch_size=8, drop_last=True)
        batches = epoch(loader)
        assert len(loader) == 2 and [len(b[2]) for b in batches] == [8, 8]
        assert len(torch.cat([b[2] for b in batches]).unique()) == 16

    def test_no_shuffle_is_dataset_order(self):
        batches = epoch(DeviceLoader(tiny_dataset(), batch_size=10, shuffle=False))
        assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(23))

    def test_inputs_are_normalized_dataset_rows(self):
        ds = tiny_dataset()
        for inputs, targets, indices in DeviceLoader(ds, batch_size=5):
            assert torch.equal(inputs, normalize(ds.images[indices], ds.mean, ds.std))
            assert torch.equal(targets, ds.labels[indices])

    def test_epochs_differ_and_seed_reproduces(self):
        a, b, c = (DeviceLoader(tiny_dataset(), 8, seed=s) for s in (0, 0, 1))
        a1, a2 = torch.cat([x[2] for x in a]), torch.cat([x[2] for x in a])
        b1, c1 = torch.cat([x[2] for x in b]), torch.cat([x[2] for x in c])
        assert not torch.equal(a1, a2) and torch.equal(a1, b1) and not torch.equal(a1, c1)
        assert a.epoch == 2

    def test_augmentation_uses_the_loader_generator(self):
        augment = Augment(crop_padding=1, flip=True, cutout=2)
        a, b = (DeviceLoader(tiny_dataset(), 8, shuffle=False, augment=augment, seed=3) for _ in range(2))
        first, second = epoch(a), epoch(a)
        assert same_epochs(first, epoch(b))  # same seed, same augmentation
        assert not torch.equal(first[0][0], second[0][0])  # same examples, fresh draws next epoch

    def test_state_dict_round_trip(self):
        augment = Augment(crop_padding=1, flip=True, cutout=2)
        original = DeviceLoader(tiny_dataset(), 8, augment=augment, seed=7)
        epoch(original)
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        expected = epoch(original)
        restored = DeviceLoader(tiny_dataset(), 8, augment=augment, seed=123)
        buffer.seek(0)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert restored.epoch == 1
        assert same_epochs(epoch(restored), expected)
        assert same_epochs(epoch(restored), epoch(original))

    def test_bad_batch_size(self):
        with pytest.raises(ValueError, match="batch_size"):
            DeviceLoader(tiny_dataset(), 0)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda(self):
        ds = tiny_dataset().to("cuda")
        loader = DeviceLoader(ds, 8, augment=Augment(2, True, 2))
        batches = epoch(loader)
        assert all(t.device.type == "cuda" for b in batches for t in b)
        assert torch.equal(torch.cat([b[2] for b in batches]).sort().values.cpu(), torch.arange(23))
        restored = DeviceLoader(ds, 8, augment=Augment(2, True, 2), seed=5)
        restored.load_state_dict(loader.state_dict())
        assert same_epochs(epoch(restored), epoch(loader))
