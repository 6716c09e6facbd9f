"""Labelled image data sets as tensors in [-1, 1] with integer labels and a fixed train/test split.

Every loader returns an `ImageDataset`: images (N, C, H, W) float32 in [-1, 1], labels (N,) int64 and the
class names in label order. Splits are fixed (the data set's own, or a seeded / rule-based one), so two loads
on any machine give identical tensors and the same `ImageDataset.fingerprint`.

    digits        scikit-learn's 8x8 digits (ships with scikit-learn), bilinearly resized, default 16x16
    fashion_mnist Fashion-MNIST from its IDX files, padded from 28 to 32 with the background value
    cifar10       CIFAR-10 through torchvision (optional dependency), 3x32x32
    image_folder  one folder per class, e.g. ImageNet area-downsampled to 64x64

A prepared data set is stored as one file with uint8 images (`save_prepared`, `load_prepared`).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cfg.data.images import from_uint8, to_uint8
from cfg.io import atomic_save, load
from cfg.registry import Registry

# name -> loader(*, root, image_size, download, max_train, max_test) -> ImageDataset
DATASETS: Registry[Callable[..., ImageDataset]] = Registry(
    "data set", reserved=("root", "image_size", "download", "max_train", "max_test")
)

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# Fashion-MNIST's original file names, without the optional .gz suffix
FASHION_MNIST_FILES: dict[str, str] = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# IDX magic number -> number of dimensions, for the uint8 kinds MNIST-style files use (0x0801, 0x0803)
_IDX_MAGIC: dict[int, int] = {2049: 1, 2051: 3}

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Tag written into prepared files, so that loading some other file fails with a clear error
_PREPARED_FORMAT = "cfg-lab/prepared-dataset/v1"


@dataclass
class ImageDataset:
    """A labelled image data set with a fixed train/test split; images (N, C, H, W) float32 in [-1, 1]."""

    name: str  # data set name, one of DATASETS
    train_x: Tensor  # (N, C, H, W) float32 in [-1, 1]
    train_y: Tensor  # (N,) int64 in [0, num_classes)
    test_x: Tensor  # (M, C, H, W) float32 in [-1, 1]
    test_y: Tensor  # (M,) int64 in [0, num_classes)
    classes: list[str]  # class names in label order

    def __post_init__(self) -> None:
        # Fail where a malformed data set is built, not deep inside training
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.float32 or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
                raise ValueError(
                    f"{self.name}: {split}_x must be square images (N, C, H, H) float32, "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
            if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: {split}_y must be ({x.shape[0]},) int64, got {tuple(y.shape)} {y.dtype}"
                )
            if x.numel() and (x.min() < -1 or x.max() > 1):
                raise ValueError(
                    f"{self.name}: {split}_x must lie in [-1, 1], got [{x.min():.4g}, {x.max():.4g}]"
                )
            if y.numel() and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(
                    f"{self.name}: {split}_y must lie in [0, {len(self.classes)}), "
                    f"got [{int(y.min())}, {int(y.max())}]"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test images differ in shape: "
                f"{tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Image channels C."""
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        """Image height = width in pixels."""
        return self.train_x.shape[-1]

    def fingerprint(self) -> str:
        """sha256 hex of the name and both splits' uint8-quantised images and labels."""
        h = hashlib.sha256()
        h.update(f"name={self.name}\n".encode())
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            # Shapes are hashed too, so that the same bytes in another layout give another fingerprint;
            # fixed little-endian int64 labels keep the hash independent of the machine
            h.update(f"{split}_x={tuple(x.shape)}\n".encode())
            h.update(to_uint8(x).contiguous().numpy())
            h.update(f"{split}_y={tuple(y.shape)}\n".encode())
            h.update(y.numpy().astype("<i8").tobytes())
        return h.hexdigest()


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array in an IDX file (gzip or plain), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"malformed IDX file {path}: corrupt gzip data ({e})") from e
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic not in _IDX_MAGIC:
        raise ValueError(
            f"malformed IDX file {path}: magic number {magic}, expected 2049 (uint8 labels) "
            "or 2051 (uint8 images)"
        )
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"malformed IDX file {path}: {len(raw)} bytes, shorter than its {header}-byte header"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(dims):
        raise ValueError(
            f"malformed IDX file {path}: header says {dims} = {math.prod(dims)} values "
            f"but {len(raw) - header} bytes follow it"
        )
    # copy: frombuffer's array is read-only, which torch.from_numpy warns about
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,  # folder holding the data; not used by `digits`
    image_size: int | None = None,  # output height = width in pixels; None for the data set's default
    download: bool = False,  # let torchvision download fashion_mnist / cifar10 when absent from root
    max_train: int | None = None,  # keep only this many training images (class-balanced prefix)
    max_test: int | None = None,  # keep only this many test images (class-balanced prefix)
) -> ImageDataset:
    """Load a data set by name (one of DATASETS) with its fixed train/test split, images in [-1, 1]."""
    loader = DATASETS[name]
    for key, value in (("image_size", image_size), ("max_train", max_train), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
    return loader(
        root=None if root is None else Path(root).expanduser(),
        image_size=image_size,
        download=download,
        max_train=max_train,
        max_test=max_test,
    )


def save_prepared(ds: ImageDataset, path: str | Path) -> None:
    """Write a data set to one file, images as uint8, with its labels, classes, name and fingerprint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(
        {
            "format": _PREPARED_FORMAT,
            "name": ds.name,
            "classes": list(ds.classes),
            "train_x": to_uint8(ds.train_x),
            "train_y": ds.train_y,
            "test_x": to_uint8(ds.test_x),
            "test_y": ds.test_y,
            "fingerprint": ds.fingerprint(),
        },
        path,
    )


def load_prepared(path: str | Path) -> ImageDataset:
    """Read a file written by `save_prepared`; images come back as float32 in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no prepared data set at {path}; write it with cfg.data.datasets.save_prepared"
        )
    d = load(path, what="prepared data set", rerun="dvc repro prepare")
    if not isinstance(d, dict) or d.get("format") != _PREPARED_FORMAT:
        raise ValueError(f"{path} is not a prepared data set written by cfg.data.datasets.save_prepared")
    ds = ImageDataset(
        name=d["name"],
        train_x=from_uint8(d["train_x"]),
        train_y=d["train_y"],
        test_x=from_uint8(d["test_x"]),
        test_y=d["test_y"],
        classes=list(d["classes"]),
    )
    if ds.fingerprint() != d["fingerprint"]:
        raise ValueError(f"{path} is corrupt: its content does not match the fingerprint stored with it")
    return ds


def _balanced_prefix(y: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of the first n examples in round-robin class order, returned in data-set order."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    # Rank of each example within its class; sorting by (rank, class) cycles through the classes,
    # so any prefix holds every class about equally often without a random generator
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = y == c
        rank[members] = np.arange(members.sum())
    return np.sort(np.lexsort((y, rank))[:n])


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, C, H, H) images to (N, C, size, size), antialiased when shrinking."""
    if x.shape[-1] == size:
        return x
    x = F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1]
    )
    return x.clamp(-1, 1)  # bilinear weights are convex, so this only removes float round-off


def _from_uint8_hwc(x: np.ndarray) -> Tensor:
    """uint8 images (N, H, W, C) to float32 (N, C, H, W) in [-1, 1]."""
    return from_uint8(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous())


def _require_root(name: str, root: Path | None) -> Path:
    """The root folder, or an error saying that this data set needs one."""
    if root is None:
        raise ValueError(f"data set {name!r} needs root=..., the folder holding its files (data.root)")
    return root


def _import_torchvision(purpose: str) -> ModuleType:
    """torchvision, imported only when needed because it is an optional dependency."""
    try:
        import torchvision
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs torchvision, which is not installed: pip install torchvision "
            "(or pip install 'cfg-lab[vision]')"
        ) from e
    return torchvision


@DATASETS.register("digits")
def _digits(
    *, root: Path | None, image_size: int | None, download: bool, max_train: int | None, max_test: int | None
) -> ImageDataset:
    """scikit-learn's 8x8 digits, stratified 80/20 split (seed 0), resized to image_size (default 16)."""
    # Imported here: scikit-learn takes about a second to import and only this loader needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = bunch.images, bunch.target.astype(np.int64)  # (1797, 8, 8) in 0..16, (1797,)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    size = 16 if image_size is None else image_size
    splits = []
    for idx, n in ((np.sort(idx_train), max_train), (np.sort(idx_test), max_test)):
        idx = idx[_balanced_prefix(labels[idx], n)]
        x = torch.from_numpy(images[idx]).float().unsqueeze(1) / 8 - 1  # (N, 1, 8, 8), 0..16 -> [-1, 1]
        splits += [_resize(x, size), torch.from_numpy(labels[idx])]
    return ImageDataset("digits", *splits, classes=[str(i) for i in range(10)])


def _find_fashion_mnist(root: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The folders searched for Fashion-MNIST IDX files, and the files from the first that has all four."""
    folders = [root, root / "raw", root / "FashionMNIST" / "raw"]  # last: torchvision's layout
    for folder in folders:
        found = {}
        for key, stem in FASHION_MNIST_FILES.items():
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is not None:
                found[key] = path
        if len(found) == len(FASHION_MNIST_FILES):
            return folders, found
    return folders, None


def _read_fashion_mnist(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays, checked for the expected shapes and labels."""
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{files[f'{split}_x']} should hold 28x28 images, got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"{files[f'{split}_y']} should hold {len(x)} labels (one per image in "
                f"{files[f'{split}_x'].name}), got shape {y.shape}"
            )
        if len(y) and y.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{files[f'{split}_y']} has label {y.max()}, expected 0..9")
        arrays[f"{split}_y"] = y.astype(np.int64)
    return arrays


@DATASETS.register("fashion_mnist")
def _fashion_mnist(
    *, root: Path | None, image_size: int | None, download: bool, max_train: int | None, max_test: int | None
) -> ImageDataset:
    """Fashion-MNIST from its IDX files, 1x28x28 padded to 1x32x32, then resized if image_size != 32."""
    root = _require_root("fashion_mnist", root)
    folders, files = _find_fashion_mnist(root)
    if files is not None:
        arrays = _read_fashion_mnist(files)
    elif download:
        tv = _import_torchvision(f"downloading Fashion-MNIST (no IDX files under {root})")
        arrays = {}
        for split, train in (("train", True), ("test", False)):
            d = tv.datasets.FashionMNIST(str(root), train=train, download=True)
            arrays[f"{split}_x"], arrays[f"{split}_y"] = d.data.numpy(), d.targets.numpy().astype(np.int64)
    else:
        names = ", ".join(f"{stem}(.gz)" for stem in FASHION_MNIST_FILES.values())
        raise FileNotFoundError(
            f"no Fashion-MNIST IDX files under {root} (looked in {', '.join(map(str, folders))}); "
            f"put {names} there, or set data.download: true on a machine with internet"
        )
    splits = []
    for split, n in (("train", max_train), ("test", max_test)):
        idx = _balanced_prefix(arrays[f"{split}_y"], n)
        # Pad 28 -> 32 with 0, the black background, so the U-Net's power-of-two downsampling fits
        x = np.pad(arrays[f"{split}_x"][idx], ((0, 0), (2, 2), (2, 2)))  # (N, 32, 32) uint8
        x = _from_uint8_hwc(x[..., None])  # (N, 1, 32, 32)
        splits += [
            x if image_size is None else _resize(x, image_size),
            torch.from_numpy(arrays[f"{split}_y"][idx]),
        ]
    return ImageDataset("fashion_mnist", *splits, classes=list(FASHION_MNIST_CLASSES))


@DATASETS.register("cifar10")
def _cifar10(
    *, root: Path | None, image_size: int | None, download: bool, max_train: int | None, max_test: int | None
) -> ImageDataset:
    """CIFAR-10 through torchvision, 3x32x32, resized if image_size != 32."""
    root = _require_root("cifar10", root)
    tv = _import_torchvision("the cifar10 data set")
    splits, classes = [], []
    for train, n in ((True, max_train), (False, max_test)):
        try:
            d = tv.datasets.CIFAR10(str(root), train=train, download=download)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"no CIFAR-10 data under {root} ({e}); put the extracted cifar-10-batches-py folder there, "
                "or set data.download: true on a machine with internet"
            ) from e
        y = np.asarray(d.targets, dtype=np.int64)
        idx = _balanced_prefix(y, n)
        x = _from_uint8_hwc(d.data[idx])  # (N, 32, 32, 3) uint8 -> (N, 3, 32, 32)
        splits += [x if image_size is None else _resize(x, image_size), torch.from_numpy(y[idx])]
        classes = list(d.classes)
    return ImageDataset("cifar10", *splits, classes=classes)


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of folder, one per class."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files directly inside folder."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )  # fmt: skip


def _load_images(paths: list[Path], image_size: int | None) -> np.ndarray:
    """RGB images (N, H, W, 3) uint8, area-resized to image_size or else required to share one square size."""
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BOX)
            arrays.append(np.asarray(im))
        if arrays[-1].shape != arrays[0].shape or arrays[-1].shape[0] != arrays[-1].shape[1]:
            raise ValueError(
                f"image {path} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {paths[0]} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; images must all be square and of one size, "
                "or set image_size to resize them"
            )
    return np.stack(arrays)


@DATASETS.register("image_folder")
def _image_folder(
    *, root: Path | None, image_size: int | None, download: bool, max_train: int | None, max_test: int | None
) -> ImageDataset:
    """One folder per class; split by root/train + root/test (or root/val), else every 5th file to test."""
    root = _require_root("image_folder", root)
    layout = "root/<class>/*.png, or root/train/<class>/*.png with root/test/<class>/*.png"
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}; expected {layout}")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    train_items: list[tuple[Path, int]] = []
    test_items: list[tuple[Path, int]] = []
    if (root / "train").is_dir():
        if test_dir is None:
            raise FileNotFoundError(f"{root / 'train'} exists but neither {root / 'test'} nor {root / 'val'}")
        classes = _class_folders(root / "train")
        unknown = sorted(set(_class_folders(test_dir)) - set(classes))
        if unknown:
            raise ValueError(f"{test_dir} has class folders missing from {root / 'train'}: {unknown}")
        for label, c in enumerate(classes):
            train_items += [(p, label) for p in _image_files(root / "train" / c)]
            if (test_dir / c).is_dir():
                test_items += [(p, label) for p in _image_files(test_dir / c)]
        train_root = root / "train"
    else:
        classes = _class_folders(root)
        for label, c in enumerate(classes):
            # Every 5th file of the sorted list goes to test: a fixed 80/20 split that needs no seed
            for i, p in enumerate(_image_files(root / c)):
                (test_items if i % 5 == 4 else train_items).append((p, label))
        train_root = root
    if not classes:
        raise FileNotFoundError(f"no class folders under {train_root}; expected {layout}")
    empty = sorted(set(classes) - {classes[label] for _, label in train_items})
    if empty:
        raise ValueError(f"class folders without training images under {train_root}: {empty}")
    ys = [np.array([label for _, label in items], dtype=np.int64) for items in (train_items, test_items)]
    keep = [_balanced_prefix(y, n) for y, n in zip(ys, (max_train, max_test), strict=True)]
    paths = [[items[i][0] for i in idx] for items, idx in zip((train_items, test_items), keep, strict=True)]
    # Load both splits together so that one size check covers them all
    images = _from_uint8_hwc(_load_images(paths[0] + paths[1], image_size))  # (N + M, 3, H, H)
    # clone: slices would share one storage, and torch.save of either would write both
    n_train = len(paths[0])
    return ImageDataset(
        "image_folder",
        images[:n_train].clone(),
        torch.from_numpy(ys[0][keep[0]]),
        images[n_train:].clone(),
        torch.from_numpy(ys[1][keep[1]]),
        classes=classes,
    )
