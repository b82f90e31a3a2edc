"""Partitions are disjoint and cover the client pool; the server split never reaches a client."""

from __future__ import annotations

import numpy as np
import pytest

from task.config import compose_config
from task.data import federated_data
from task.partition import (
    dirichlet_partition,
    iid_partition,
    limit_indices,
    malicious_client_ids,
    pathological_partition,
    server_split,
)

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged)) == n, "partitions overlap or miss samples"
    assert merged.min() == 0 and merged.max() == n - 1


@pytest.mark.parametrize("make", [
    lambda: iid_partition(LABELS, 7, seed=1),
    lambda: dirichlet_partition(LABELS, 7, seed=1, alpha=0.5),
    lambda: pathological_partition(LABELS, 10, seed=1, classes_per_client=2),
])
def test_partitions_are_disjoint_and_cover_the_pool(make):
    parts = make()
    assert_disjoint_cover(parts, len(LABELS))


def test_iid_partition_is_balanced_and_shuffled():
    parts = iid_partition(LABELS, 6, seed=3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # not a contiguous block


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    def mean_max_share(alpha):
        parts = dirichlet_partition(LABELS, 10, seed=0, alpha=alpha)
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_dirichlet_is_deterministic_under_seed_and_changes_with_it():
    a = dirichlet_partition(LABELS, 5, seed=4, alpha=0.5)
    b = dirichlet_partition(LABELS, 5, seed=4, alpha=0.5)
    c = dirichlet_partition(LABELS, 5, seed=5, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_pathological_gives_each_client_its_number_of_classes():
    parts = pathological_partition(LABELS, 5, seed=0, classes_per_client=2)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_server_split_is_disjoint_and_of_the_requested_size():
    server, pool = server_split(1000, 0.1, seed=0)
    assert len(server) == 100 and len(pool) == 900
    assert not set(server) & set(pool)
    assert len(np.union1d(server, pool)) == 1000


def test_server_split_never_reaches_a_client(tiny_idx_root):
    cfg = compose_config(["num_clients=5", f"dataset.root={tiny_idx_root}", "server.val_fraction=0.2"])
    data = federated_data(cfg)
    clients = np.concatenate(data.client_indices)
    assert len(data.server_indices) == round(0.2 * len(data.train_y))
    assert not set(clients) & set(data.server_indices)
    assert len(clients) + len(data.server_indices) == len(data.train_y)
    # and the cache hands back the very same object for the same config
    assert federated_data(cfg) is data


def test_limit_indices_is_a_seeded_subset():
    a, b = limit_indices(100, 10, 0), limit_indices(100, 10, 0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 10
    assert len(limit_indices(100, None, 0)) == 100


def test_malicious_ids_draw_and_explicit_list():
    drawn = malicious_client_ids(10, 0.3, None, seed=0)
    assert len(drawn) == 3 and drawn == malicious_client_ids(10, 0.3, None, seed=0)
    assert malicious_client_ids(10, 0.3, [1, 4], seed=0) == {1, 4}
    assert malicious_client_ids(10, 0.0, None, seed=0) == frozenset()
