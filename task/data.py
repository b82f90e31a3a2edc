"""The federated view of a data set: server split, client partitions, test set, and input preprocessing.

Built once per process and cached (Ray actors and SuperNode executors reuse processes), so a client
never re-reads files or re-partitions per round. Images stay uint8 NHWC in memory; batches are turned
into float tensors only when they are used, which keeps triggers in pixel space before normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from task.datasets import ImageDataset, load_dataset
from task.partition import limit_indices, server_split


def to_unit_float(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (pixel space: where triggers are stamped)."""
    x = torch.as_tensor(x_uint8)
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


@dataclass(frozen=True)
class InputSpec:
    """How a pixel-space batch becomes model input: optional augmentation, resize, channel repeat,
    normalisation (in that order)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int        # size the model sees
    channels: int          # channels the model sees
    augment: bool = False

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop (zero padding 4) and horizontal flip, per sample and vectorised; `x` in pixel space."""
        n, c, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n,), generator=generator)
        dx = torch.randint(0, 9, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, c, h, w + 8)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, c, h, w)
        cropped = padded.gather(2, rows).gather(3, cols)
        flip = torch.rand(n, generator=generator) < 0.5
        cropped[flip] = cropped[flip].flip(-1)
        return cropped

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space [0,1] NCHW -> normalised model input."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
            x = x.expand(-1, self.channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        if mean.numel() != x.shape[1]:  # grayscale statistics repeated to 3 channels
            mean, std = mean.expand(x.shape[1]), std.expand(x.shape[1])
        return (x - mean[None, :, None, None]) / std[None, :, None, None]


@dataclass
class FederatedData:
    """Everything a run needs to know about its data; identical in every process for the same config."""

    dataset: ImageDataset
    train_x: np.ndarray            # uint8 NHWC, after `dataset.train_limit`
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    server_indices: np.ndarray     # into train_x: the server's clean split (never reaches a client)
    pool_indices: np.ndarray       # into train_x: everything else, what the partitioner divides
    partition_cfg: dict            # the partition group (its `_target_` and parameters)
    num_clients: int
    seed: int
    spec: InputSpec

    @cached_property
    def client_indices(self) -> tuple[np.ndarray, ...]:
        """Into train_x: one array per client (partition id). Computed on first use: the server
        process never needs it, which keeps its start-up short."""
        parts = instantiate(self.partition_cfg, labels=self.train_y[self.pool_indices],
                            num_clients=self.num_clients, seed=self.seed)
        return tuple(self.pool_indices[p] for p in parts)  # partition positions -> training-set positions

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def client_data(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.client_indices[partition_id]
        return self.train_x[idx], self.train_y[idx]

    def server_data(self) -> tuple[np.ndarray, np.ndarray]:
        return self.train_x[self.server_indices], self.train_y[self.server_indices]


def input_spec(cfg: DictConfig, dataset: ImageDataset) -> InputSpec:
    _, h, _, c = dataset.x_train.shape
    return InputSpec(mean=tuple(dataset.mean), std=tuple(dataset.std),
                     image_size=int(cfg.model.input_size or h), channels=int(cfg.model.input_channels or c),
                     augment=bool(cfg.dataset.augment))


_CACHE: dict[str, FederatedData] = {}


def federated_data(cfg: DictConfig) -> FederatedData:
    """Load, limit, split and partition, once per process for a given data-related config."""
    keys = {"dataset": cfg.dataset, "partition": cfg.partition, "num_clients": cfg.num_clients,
            "seed": cfg.seed, "val_fraction": cfg.server.val_fraction,
            "model_input": [cfg.model.input_size, cfg.model.input_channels]}
    cache_key = json.dumps(OmegaConf.to_container(OmegaConf.create(keys), resolve=True), sort_keys=True)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    ds_cfg = cfg.dataset
    dataset = load_dataset(ds_cfg.name, root=ds_cfg.root, download=bool(ds_cfg.download),
                           imbalance_factor=float(ds_cfg.get("imbalance_factor", 100.0)), seed=int(cfg.seed))
    keep = limit_indices(len(dataset.y_train), ds_cfg.train_limit, cfg.seed)
    keep_test = limit_indices(len(dataset.y_test), ds_cfg.test_limit, cfg.seed + 1)
    train_x, train_y = dataset.x_train[keep], dataset.y_train[keep]
    server_idx, pool_idx = server_split(len(train_y), float(cfg.server.val_fraction), int(cfg.seed))
    part_cfg = {k: v for k, v in OmegaConf.to_container(cfg.partition, resolve=True).items() if k != "name"}
    data = FederatedData(dataset=dataset, train_x=train_x, train_y=train_y,
                         test_x=dataset.x_test[keep_test], test_y=dataset.y_test[keep_test],
                         server_indices=server_idx, pool_indices=pool_idx, partition_cfg=part_cfg,
                         num_clients=int(cfg.num_clients), seed=int(cfg.seed), spec=input_spec(cfg, dataset))
    _CACHE[cache_key] = data
    return data
