"""Benign and malicious clients as `flwr.client.NumPyClient`s (fit/evaluate on lists of NumPy arrays).

The ClientApp handlers (`client/app.py`) build one of these per message and call it. A malicious
client is a benign one whose training batches pass through its attack's poison first.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from omegaconf import DictConfig

from attacks.base import TriggerPoison
from task.data import FederatedData
from task.train import LocalTrainingConfig, build_model, evaluate_loss_accuracy, seed_everything, train_local


class BenignClient(NumPyClient):
    """Trains the global model on its own partition with plain cross-entropy."""

    is_malicious = False

    def __init__(self, cfg: DictConfig, data: FederatedData, partition_id: int, device: torch.device,
                 state_keys: list[str]) -> None:
        self.cfg, self.data, self.partition_id, self.device = cfg, data, partition_id, device
        self.state_keys = state_keys
        self.x, self.y = data.client_data(partition_id)
        self.model = build_model(cfg, data.spec, data.num_classes)

    # NumPyClient ↔ state dict, in the key order of the message the server sent
    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.state_keys, parameters, strict=True)}
        self.model.load_state_dict(state, strict=True)

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        state = self.model.state_dict()
        return [state[k].detach().cpu().numpy() for k in self.state_keys]

    def batch_hook(self):
        """Pixel-space batch transform applied while training (none for a benign client)."""
        return

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        server_round = int(config.get("server-round", 0))
        # Seeded per (run seed, client, round): the same config gives the same update.
        generator = seed_everything(self.cfg.seed, self.partition_id, server_round)
        self.set_parameters(parameters)
        t0 = time.perf_counter()
        loss = train_local(self.model, self.x, self.y, self.data.spec, LocalTrainingConfig.from_cfg(self.cfg.local),
                           self.device, generator, batch_hook=self.batch_hook())
        seconds = time.perf_counter() - t0
        return self.get_parameters({}), len(self.y), {"train-loss": loss, "train-seconds": seconds}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):
        self.set_parameters(parameters)
        loss, acc = evaluate_loss_accuracy(self.model, self.x, self.y, self.data.spec, self.device)
        return loss, len(self.y), {"accuracy": acc}


class MaliciousClient(BenignClient):
    """Poisons a share of every training batch with its attack's trigger and target label."""

    is_malicious = True

    def __init__(self, cfg: DictConfig, data: FederatedData, partition_id: int, device: torch.device,
                 state_keys: list[str], poison: TriggerPoison) -> None:
        super().__init__(cfg, data, partition_id, device, state_keys)
        self.poison = poison

    def batch_hook(self):
        def hook(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
            x, y, _ = self.poison.poison_batch(x, y, generator)
            return x, y
        return hook
