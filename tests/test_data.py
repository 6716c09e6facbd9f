"""Tests of cfg.data.datasets: loaders, the IDX reader, uint8 quantisation, prepared files and fingerprints."""

from __future__ import annotations

import dataclasses
import gzip
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfg.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    ImageDataset,
    load_dataset,
    load_prepared,
    read_idx,
    save_prepared,
)
from cfg.data.images import from_uint8, to_uint8

# The offline Fashion-MNIST copy; CI clones the project next to `shared/`, as on the development machine
FASHION_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "FashionMNIST"
needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "raw").is_dir(), reason=f"offline Fashion-MNIST files not found at {FASHION_ROOT}/raw"
)


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    """Write a uint8 array as an IDX file (magic 2049 for 1-D, 2051 for 3-D), gzip-compressed or plain."""
    magic = {1: 2049, 3: 2051}[array.ndim]
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fashion_like(folder: Path, *, n_train: int, n_test: int, compress: bool) -> dict[str, np.ndarray]:
    """Four small Fashion-MNIST-shaped IDX files with random pixels and cyclic labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for stem, a in arrays.items():
        write_idx(folder / (f"{stem}.gz" if compress else stem), a, compress=compress)
    return arrays


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Save (H, W, 3) uint8 pixels as a PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)


def solid(value: int, label: int, size: int = 8) -> np.ndarray:
    """A one-colour image whose red channel encodes a file index and green channel a class."""
    return np.broadcast_to(np.array([value, 100 * label, 7], dtype=np.uint8), (size, size, 3)).copy()


def check_dataset(ds: ImageDataset, *, shape: tuple[int, int, int], n_train: int, n_test: int) -> None:
    """Shapes, dtypes and value ranges every loader must satisfy."""
    assert ds.train_x.shape == (n_train, *shape) and ds.test_x.shape == (n_test, *shape)
    assert ds.train_y.shape == (n_train,) and ds.test_y.shape == (n_test,)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.float32
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert ((x >= -1) & (x <= 1)).all()
        assert ((y >= 0) & (y < ds.num_classes)).all()
    assert (ds.channels, ds.image_size, ds.image_size) == shape


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    """The full digits data set at the default 16x16."""
    return load_dataset("digits")


@pytest.fixture(scope="module")
def fashion_small() -> ImageDataset:
    """Fashion-MNIST from the offline files, shrunk to 100 training and 50 test images."""
    if not (FASHION_ROOT / "raw").is_dir():
        pytest.skip(f"offline Fashion-MNIST files not found at {FASHION_ROOT}/raw")
    return load_dataset("fashion_mnist", root=FASHION_ROOT, max_train=100, max_test=50)


# --- uint8 quantisation ---


def test_uint8_roundtrip_is_exact_on_levels() -> None:
    levels = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(levels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), levels)


def test_to_uint8_rounds_to_nearest_level_and_clips() -> None:
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert (from_uint8(to_uint8(x)) - x).abs().max() <= 1 / 255 + 1e-6  # half a level, 1/127.5 / 2
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# --- digits ---


def test_digits_shapes_split_and_classes(digits: ImageDataset) -> None:
    # 1797 images, 20% test rounded up by scikit-learn
    check_dataset(digits, shape=(1, 16, 16), n_train=1437, n_test=360)
    assert digits.classes == [str(i) for i in range(10)]
    # stratified: every class has 17..19% of its images in test
    counts = torch.bincount(digits.test_y, minlength=10) / torch.bincount(
        torch.cat([digits.train_y, digits.test_y]), minlength=10
    )
    assert ((counts > 0.17) & (counts < 0.23)).all()


def test_digits_native_size_maps_0_16_to_levels_in_range() -> None:
    ds = load_dataset("digits", image_size=8)
    check_dataset(ds, shape=(1, 8, 8), n_train=1437, n_test=360)
    levels = (ds.train_x + 1) * 8  # back to 0..16
    assert torch.equal(levels, levels.round()) and levels.min() == 0 and levels.max() == 16


def test_digits_is_deterministic(digits: ImageDataset) -> None:
    again = load_dataset("digits")
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    assert again.fingerprint() == digits.fingerprint()


def test_max_train_max_test_take_a_class_balanced_subset(digits: ImageDataset) -> None:
    ds = load_dataset("digits", max_train=20, max_test=15)
    check_dataset(ds, shape=(1, 16, 16), n_train=20, n_test=15)
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [2] * 10
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [2] * 5 + [1] * 5
    # the subset is a subsequence of the full split
    full = {tuple(x.flatten().tolist()) for x in digits.train_x}
    assert all(tuple(x.flatten().tolist()) in full for x in ds.train_x)


# --- IDX reader ---


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x", images, compress=compress)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "y", labels, compress=compress)), labels)


def test_read_idx_rejects_bad_magic_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress((2052).to_bytes(4, "big") + bytes(16)))
    with pytest.raises(ValueError, match=r"bad-idx3-ubyte\.gz.*magic number 2052"):
        read_idx(path)


def test_read_idx_rejects_wrong_size_and_truncated_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "short", np.zeros((3, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"short.*\(3, 28, 28\)"):
        read_idx(path)
    gz = write_idx(tmp_path / "cut.gz", np.zeros((3, 28, 28), np.uint8), compress=True)
    gz.write_bytes(gz.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(gz)


# --- Fashion-MNIST ---


@needs_fashion
def test_fashion_mnist_files_hold_the_official_counts_and_labels() -> None:
    train_y = read_idx(FASHION_ROOT / "raw" / "train-labels-idx1-ubyte.gz")
    test_y = read_idx(FASHION_ROOT / "raw" / "t10k-labels-idx1-ubyte.gz")
    assert train_y.shape == (60000,) and test_y.shape == (10000,)
    assert test_y[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert np.bincount(train_y).tolist() == [6000] * 10


@needs_fashion
def test_fashion_mnist_loads_padded_and_balanced(fashion_small: ImageDataset) -> None:
    ds = fashion_small
    check_dataset(ds, shape=(1, 32, 32), n_train=100, n_test=50)
    assert ds.classes == FASHION_MNIST_CLASSES
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [10] * 10
    assert ds.test_y[:5].tolist() == [9, 2, 1, 1, 6]  # the subset keeps the files' order
    # 2-pixel padding with the background value
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (ds.train_x[:, 0, border] == -1).all()
    assert torch.equal(to_uint8(from_uint8(to_uint8(ds.train_x))), to_uint8(ds.train_x))


@needs_fashion
def test_fashion_mnist_is_deterministic(fashion_small: ImageDataset) -> None:
    again = load_dataset("fashion_mnist", root=FASHION_ROOT, max_train=100, max_test=50)
    assert torch.equal(again.train_x, fashion_small.train_x) and torch.equal(
        again.test_y, fashion_small.test_y
    )
    assert again.fingerprint() == fashion_small.fingerprint()


@pytest.mark.parametrize(("layout", "compress"), [(".", False), ("raw", True), ("FashionMNIST/raw", True)])
def test_fashion_mnist_found_in_each_layout(tmp_path: Path, layout: str, compress: bool) -> None:
    arrays = write_fashion_like(tmp_path / layout, n_train=30, n_test=20, compress=compress)
    ds = load_dataset("fashion_mnist", root=tmp_path)
    check_dataset(ds, shape=(1, 32, 32), n_train=30, n_test=20)
    assert torch.equal(
        to_uint8(ds.train_x[:, 0, 2:30, 2:30]), torch.from_numpy(arrays["train-images-idx3-ubyte"])
    )
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_resizes_after_padding(tmp_path: Path) -> None:
    write_fashion_like(tmp_path, n_train=10, n_test=10, compress=False)
    full = load_dataset("fashion_mnist", root=tmp_path)
    ds = load_dataset("fashion_mnist", root=tmp_path, image_size=16)
    check_dataset(ds, shape=(1, 16, 16), n_train=10, n_test=10)
    # antialiased downsampling of the padded 32x32 images keeps each image's mean brightness
    assert torch.allclose(ds.train_x.mean((1, 2, 3)), full.train_x.mean((1, 2, 3)), atol=0.02)


def test_fashion_mnist_rejects_mismatched_counts(tmp_path: Path) -> None:
    write_fashion_like(tmp_path, n_train=10, n_test=10, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(9, np.uint8), compress=False)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*10 labels"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_fashion_mnist_missing_names_the_path_and_the_remedy(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", root=root)
    message = str(err.value)
    assert str(root) in message and str(root / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "download" in message


# --- CIFAR-10 (torchvision is optional) ---


def test_cifar10_without_torchvision_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_dataset("cifar10", root=tmp_path)


def fake_torchvision(**datasets: type) -> types.ModuleType:
    """A stand-in torchvision module whose `datasets` holds the given classes."""
    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(**datasets)
    return module


def test_cifar10_converts_torchvision_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeCIFAR10:
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert root == str(tmp_path) and download is False
            n = 30 if train else 20
            # (N, 32, 32, 3) uint8 with channel c of image i equal to i + 100 c
            self.data = (np.arange(n)[:, None, None, None] + np.array([0, 100, 200])).astype(np.uint8)
            self.data = np.broadcast_to(self.data, (n, 32, 32, 3)).copy()
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(CIFAR10=FakeCIFAR10))
    ds = load_dataset("cifar10", root=tmp_path, max_test=10)
    check_dataset(ds, shape=(3, 32, 32), n_train=30, n_test=10)
    assert ds.classes == FakeCIFAR10.classes
    assert to_uint8(ds.train_x[5, :, 0, 0]).tolist() == [5, 105, 205]  # channels moved first
    assert ds.test_y.tolist() == list(range(10))


def test_fashion_mnist_download_falls_back_to_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            n = 12 if train else 8
            self.data = torch.full((n, 28, 28), 255, dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(FashionMNIST=FakeFashionMNIST))
    ds = load_dataset("fashion_mnist", root=tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    check_dataset(ds, shape=(1, 32, 32), n_train=12, n_test=8)
    assert ds.train_x[:, :, 2:30, 2:30].eq(1).all() and ds.train_x[:, :, :2].eq(-1).all()


def test_cifar10_missing_data_names_the_path(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset("cifar10", root=tmp_path)


# --- image folders ---


def test_image_folder_splits_every_fifth_file(tmp_path: Path) -> None:
    counts = {"cat": 7, "dog": 5, "emu": 10}
    for label, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_png(tmp_path / name / f"img{i:02d}.png", solid(10 * i, label))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("image_folder", root=tmp_path)
    check_dataset(ds, shape=(3, 8, 8), n_train=18, n_test=4)
    assert ds.classes == ["cat", "dog", "emu"]
    # test holds files 4 (and 9) of each class, in class order; the red channel tells the file index
    assert ds.test_y.tolist() == [0, 1, 2, 2]
    assert to_uint8(ds.test_x[:, 0, 0, 0]).tolist() == [40, 40, 40, 90]
    assert to_uint8(ds.test_x[:, 1, 0, 0]).tolist() == [0, 100, 200, 200]
    assert ds.train_y.tolist() == [0] * 6 + [1] * 4 + [2] * 8
    assert to_uint8(ds.train_x[:6, 0, 0, 0]).tolist() == [0, 10, 20, 30, 50, 60]


def test_image_folder_uses_train_and_val_folders(tmp_path: Path) -> None:
    for label, name in enumerate(["b", "a"]):
        for i in range(3):
            write_png(tmp_path / "train" / name / f"{i}.png", solid(i, label))
        write_png(tmp_path / "val" / name / "0.png", solid(200, label))
    ds = load_dataset("image_folder", root=tmp_path, max_train=4)
    assert ds.classes == ["a", "b"]
    check_dataset(ds, shape=(3, 8, 8), n_train=4, n_test=2)
    assert ds.train_y.tolist() == [0, 0, 1, 1] and ds.test_y.tolist() == [0, 1]
    assert (to_uint8(ds.test_x[:, 0]) == 200).all()


def test_image_folder_resizes_with_area_filter(tmp_path: Path) -> None:
    checker = np.indices((8, 8)).sum(0) % 2 * 255  # 1-pixel checkerboard
    write_png(tmp_path / "only" / "0.png", np.repeat(checker[..., None], 3, axis=2))
    ds = load_dataset("image_folder", root=tmp_path, image_size=4)
    check_dataset(ds, shape=(3, 4, 4), n_train=1, n_test=0)
    assert ds.train_x.abs().max() < 0.01  # area averaging gives grey; nearest would keep black and white


def test_image_folder_requires_one_size(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "0.png", solid(0, 0, size=8))
    write_png(tmp_path / "a" / "1.png", solid(0, 0, size=6))
    with pytest.raises(ValueError, match=r"1\.png.*image_size"):
        load_dataset("image_folder", root=tmp_path)
    assert load_dataset("image_folder", root=tmp_path, image_size=6).image_size == 6


def test_image_folder_missing_or_empty_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_dataset("image_folder", root=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"no class folders under {tmp_path}"):
        load_dataset("image_folder", root=tmp_path)
    (tmp_path / "empty").mkdir()
    write_png(tmp_path / "full" / "0.png", solid(0, 0))
    with pytest.raises(ValueError, match="without training images.*empty"):
        load_dataset("image_folder", root=tmp_path)


# --- argument checks ---


def test_unknown_name_lists_the_data_sets() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    assert "'mnist'" in str(err.value) and all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"max_train": 0}, {"max_test": -1}, {"max_train": 2.5}]
)
def test_bad_sizes_are_rejected(kwargs: dict) -> None:
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{key} must be a positive integer"):
        load_dataset("digits", **kwargs)


def test_file_based_sets_need_a_root() -> None:
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("fashion_mnist")


def test_dataset_rejects_out_of_range_values() -> None:
    x, y = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ImageDataset("t", x + 2, y, x, y, classes=["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ImageDataset("t", x, y + 1, x, y, classes=["a"])


# --- prepared files and fingerprints ---


def test_prepared_roundtrip_matches_uint8_quantisation(tmp_path: Path, digits: ImageDataset) -> None:
    path = tmp_path / "prepared" / "digits.pt"
    save_prepared(digits, path)
    assert [p.name for p in path.parent.iterdir()] == ["digits.pt"]
    back = load_prepared(path)
    assert back.name == "digits" and back.classes == digits.classes
    assert torch.equal(back.train_x, from_uint8(to_uint8(digits.train_x)))
    assert torch.equal(back.test_x, from_uint8(to_uint8(digits.test_x)))
    assert torch.equal(back.train_y, digits.train_y) and torch.equal(back.test_y, digits.test_y)
    assert back.fingerprint() == digits.fingerprint()
    # images are stored as uint8, about a quarter of the float size
    assert path.stat().st_size < digits.train_x.numel() * 1.5
    save_prepared(back, tmp_path / "again.pt")
    assert load_prepared(tmp_path / "again.pt").fingerprint() == digits.fingerprint()


def test_load_prepared_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.pt")):
        load_prepared(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a prepared data set"):
        load_prepared(tmp_path / "other.pt")


def test_fingerprint_changes_with_one_pixel_label_or_name(digits: ImageDataset) -> None:
    def copy(**changes: object) -> ImageDataset:
        tensors = {k: getattr(digits, k).clone() for k in ("train_x", "train_y", "test_x", "test_y")}
        return dataclasses.replace(digits, **{**tensors, **changes})

    base = digits.fingerprint()
    pixel = copy()
    pixel.test_x[3, 0, 5, 5] = 1.0 if pixel.test_x[3, 0, 5, 5] < 0 else -1.0
    label = copy()
    label.train_y[0] = (label.train_y[0] + 1) % 10
    assert len({base, pixel.fingerprint(), label.fingerprint(), copy(name="digits2").fingerprint()}) == 4
    # below half a uint8 level the quantised images, and so the fingerprint, do not change
    tiny = copy()
    tiny.train_x[0, 0, 0, 0] = -1 + 1e-4
    assert digits.train_x[0, 0, 0, 0] == -1 and tiny.fingerprint() == base


def test_fingerprint_is_pinned() -> None:
    # A hand-built set: the hash must not change across runs, machines or refactors of fingerprint()
    x = from_uint8(torch.arange(2 * 1 * 2 * 2, dtype=torch.uint8).reshape(2, 1, 2, 2) * 17)
    ds = ImageDataset("pinned", x, torch.tensor([0, 1]), x[:1], torch.tensor([1]), classes=["a", "b"])
    assert ds.fingerprint() == "0c4f7c5f18d9d08fd93e0a78ac6c3d464345d5608783505057ab8dc8aba483ae"


# ---------------------------------------------------------------------------------------------------------
# cfg.data.sources: the files outside the repository, hashed by the `inputs` stage for DVC


def write_fashion_mnist(root: Path, *, n_train: int = 40, n_test: int = 20, shift: int = 0) -> Path:
    """A small Fashion-MNIST in its original layout (raw/*.gz), labels i mod 10 (+ shift)."""
    rng = np.random.default_rng(0)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) + shift) % 10, compress=True)
    return root


def test_data_records_name_each_file_by_its_place_under_the_root_and_hash_its_bytes(tmp_path):
    import hashlib

    from cfg.data.sources import data_record, weights_record

    a = write_fashion_mnist(tmp_path / "a")
    record = data_record("fashion_mnist", a)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.gz"))
    assert sorted(record["files"]) == files and len(files) == 4
    for name, digest in record["files"].items():
        assert digest == hashlib.sha256((a / name).read_bytes()).hexdigest()
    # the same bytes elsewhere are the same inputs; one changed label file is another
    b = write_fashion_mnist(tmp_path / "b")
    assert data_record("fashion_mnist", b) == record
    write_fashion_mnist(tmp_path / "b", shift=1)
    changed = {k for k, v in data_record("fashion_mnist", b)["files"].items() if record["files"][k] != v}
    assert changed == {"raw/train-labels-idx1-ubyte.gz", "raw/t10k-labels-idx1-ubyte.gz"}
    # a root that does not exist yet (data.download fetches into it) holds nothing
    assert data_record("fashion_mnist", tmp_path / "absent") == {"data": "fashion_mnist", "files": {}}
    # the digits come from scikit-learn's own file, whatever data.root says
    digits = data_record("digits", None)["files"]
    assert list(digits) == ["sklearn/datasets/data/digits.csv.gz"]
    import sklearn

    sk_file = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    assert digits["sklearn/datasets/data/digits.csv.gz"] == hashlib.sha256(sk_file.read_bytes()).hexdigest()
    # a file is read again only when its size or modification time changed (a cache, as DVC keeps its own)
    from cfg.data.sources import sha256

    cache: dict = {}
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    assert sha256(f, cache) == hashlib.sha256(b"one").hexdigest() and len(cache) == 1
    cache[str(f.resolve())][2] = "from the cache"
    assert sha256(f, cache) == "from the cache"
    f.write_bytes(b"three")  # another size
    assert sha256(f, cache) == hashlib.sha256(b"three").hexdigest()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    assert weights_record(weights) == {"inception_weights": hashlib.sha256(b"weights").hexdigest()}
    assert weights_record(None) == weights_record(tmp_path / "absent.pth") == {"inception_weights": None}


@pytest.mark.slow
def test_a_changed_data_file_reruns_prepare_and_unchanged_files_rerun_nothing(project, tmp_path):
    # data.root lies outside the repository and is a param only: replacing its files at the same path used to
    # leave `dvc repro` with nothing to do, and the old prepared data (and all it fed) in place
    import hashlib
    import json

    from .conftest import run, shrink_params
    from .test_pipeline_e2e import stages_run

    root = write_fashion_mnist(tmp_path / "fashion")
    shrink_params(
        project / "params.yaml",
        {
            "data": {
                "name": "fashion_mnist",
                "root": str(root),
                "image_size": None,
                "max_train": 40,
                "max_test": 20,
            }
        },
    )
    first = run(["dvc", "repro", "prepare"], project)
    assert stages_run(first.stdout) == {"inputs", "prepare"}
    fingerprint = json.loads((project / "data/prepared.json").read_text())["fingerprint"]

    again = run(["dvc", "repro", "prepare"], project)
    assert stages_run(again.stdout) == {"inputs"}, again.stdout
    assert "Stage 'prepare' didn't change, skipping" in again.stdout
    status = run(["dvc", "status", "--with-deps", "prepare"], project).stdout
    assert status.split() == ["inputs:", "always", "changed"], status  # the only entry, on every repro

    write_fashion_mnist(root, shift=1)  # the same path, other labels: still valid IDX files
    third = run(["dvc", "repro", "prepare"], project)
    assert stages_run(third.stdout) == {"inputs", "prepare"}, third.stdout
    assert json.loads((project / "data/prepared.json").read_text())["fingerprint"] != fingerprint
    record = json.loads((project / "data/inputs/data.json").read_text())
    assert sorted(record["files"]) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gz"))

    # a machine without the data (it pulled the outputs to analyse them) keeps the record, and reruns nothing
    root.rename(tmp_path / "elsewhere")
    fourth = run(["dvc", "repro", "prepare"], project)
    assert stages_run(fourth.stdout) == {"inputs"}, fourth.stdout
    assert "no fashion_mnist files under" in fourth.stderr and "kept the 4 recorded" in fourth.stderr
    assert json.loads((project / "data/inputs/data.json").read_text()) == record
    # so does the Inception weights' record (`reference` depends on it) where the file is absent
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    shrink_params(project / "params.yaml", {"evaluate": {"inception_weights": str(weights)}})
    run(["dvc", "repro", "--single-item", "inputs"], project)
    recorded = json.loads((project / "data/inputs/weights.json").read_text())
    assert recorded["inception_weights"] == hashlib.sha256(b"weights").hexdigest()
    weights.unlink()
    fifth = run(["dvc", "repro", "--single-item", "inputs"], project)
    assert "no Inception weights at" in fifth.stderr and "kept the recorded hash" in fifth.stderr
    assert json.loads((project / "data/inputs/weights.json").read_text()) == recorded
