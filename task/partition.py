"""Server split and client partitions over local data, with flwr-datasets partitioners.

Order matters for the threat model: the server's clean split is carved out of the training set
FIRST, and only the remaining indices are handed to the partitioner, so no server sample can ever
reach a client. Everything is a pure function of (labels, config, seed), which lets the ServerApp
and every ClientApp process compute the same split without talking to each other.
"""

from __future__ import annotations

import numpy as np


def _hf_labels(labels: np.ndarray):
    # flwr-datasets partitioners work on a Hugging Face `datasets.Dataset`; a two-column table of
    # (position, label) is enough and costs nothing compared with the images.
    from datasets import Dataset

    return Dataset.from_dict({"position": np.arange(len(labels)), "label": labels.astype(np.int64)})


def _run_partitioner(partitioner, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    partitioner.dataset = _hf_labels(labels)
    # with_format("numpy") reads the column at once; np.asarray on it would iterate row by row (seconds)
    return [np.sort(partitioner.load_partition(i).with_format("numpy")["position"][:].astype(np.int64))
            for i in range(num_clients)]


def iid_partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Equal-sized random shards (flwr-datasets IidPartitioner after a seeded shuffle)."""
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous ranges, so shuffle positions first with our seed.
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = _run_partitioner(IidPartitioner(num_partitions=num_clients), labels[order], num_clients)
    return [np.sort(order[p]) for p in parts]


def dirichlet_partition(labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5,
                        min_partition_size: int = 10) -> list[np.ndarray]:
    """Label skew: per class, client shares drawn from Dir(alpha) (flwr-datasets DirichletPartitioner)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                       min_partition_size=min_partition_size, self_balancing=False,
                                       shuffle=True, seed=seed)
    return _run_partitioner(partitioner, labels, num_clients)


def pathological_partition(labels: np.ndarray, num_clients: int, seed: int,
                           classes_per_client: int = 2) -> list[np.ndarray]:
    """Each client holds `classes_per_client` classes (flwr-datasets PathologicalPartitioner).

    Client i gets classes i, i+1, ... (mod the number of classes), so every class is used whenever
    num_clients >= num_classes; samples of a class are split evenly among its holders.
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                          num_classes_per_partition=classes_per_client,
                                          class_assignment_mode="deterministic", shuffle=True, seed=seed)
    return _run_partitioner(partitioner, labels, num_clients)


def server_split(num_samples: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(server_indices, client_pool_indices): a seeded random `val_fraction` of the training set for
    the server, the rest for the clients. Disjoint by construction, both sorted."""
    order = np.random.default_rng([seed, 7_919]).permutation(num_samples)
    n_server = round(val_fraction * num_samples)
    return np.sort(order[:n_server]), np.sort(order[n_server:])


def limit_indices(num_samples: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded subset of `limit` positions (all positions when limit is None or too large)."""
    if limit is None or limit >= num_samples:
        return np.arange(num_samples)
    return np.sort(np.random.default_rng([seed, 104_729]).choice(num_samples, size=limit, replace=False))


def malicious_client_ids(num_clients: int, fraction: float, explicit_ids, seed: int) -> frozenset[int]:
    """Who is malicious: the explicit list when given, else a seeded draw of round(fraction * n) clients."""
    if explicit_ids is not None:
        return frozenset(int(i) for i in explicit_ids)
    count = round(fraction * num_clients)
    drawn = np.random.default_rng([seed, 15_485_863]).choice(num_clients, size=count, replace=False)
    return frozenset(int(i) for i in drawn)
