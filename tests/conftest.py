"""Shared test helpers: a tiny on-disk IDX data set (the real loader reads it) and Flower message ids."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) in the IDX format: magic 0x0000 08 <ndim>, big-endian dims, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """A learnable 28x28 ten-class data set: class c lights up row band c (plus noise)."""
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 220
        return x, y

    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = images(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="session")
def tiny_idx_root(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("tiny-idx"))


@pytest.fixture
def flower_task_identity():
    """Flower refuses to build a Message outside a running app unless a task identity is set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    yield
