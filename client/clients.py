"""Benign and malicious clients as `flwr.client.NumPyClient`s (fit/evaluate on lists of NumPy arrays).

The ClientApp handlers (`client/app.py`) build one of these per message and call it. A malicious
client is a benign one that, in the rounds its schedule says it attacks, passes its training batches
through its trigger poison and its model through its model poison.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from omegaconf import DictConfig

from attacks.base import ModelPoison, TriggerPoison
from attacks.schedule import AttackSchedule
from task.data import FederatedData
from task.train import LocalTrainingConfig, build_model, evaluate_loss_accuracy, seed_everything, train_local


class BenignClient(NumPyClient):
    """Trains the global model on its own partition with plain cross-entropy."""

    in_attacker_pool = False

    def __init__(self, cfg: DictConfig, data: FederatedData, partition_id: int, device: torch.device,
                 state_keys: list[str]) -> None:
        self.cfg, self.data, self.partition_id, self.device = cfg, data, partition_id, device
        self.state_keys = state_keys
        self.x, self.y = data.client_data(partition_id)
        self.model = build_model(cfg, data.spec, data.num_classes)
        self.attacked = False  # whether the last fit was an attack (the truth record reports it)
        self.defense = None    # the strategy's ClientHalf (strategies/base.py), set by the ClientApp

    # NumPyClient <-> state dict, in the key order of the message the server sent
    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.state_keys, parameters, strict=True)}
        self.model.load_state_dict(state, strict=True)

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        state = self.model.state_dict()
        return [state[k].detach().cpu().numpy() for k in self.state_keys]

    def train(self, server_round: int, batch_hook=None, after_step=None) -> tuple[float, float]:
        """Local training from the parameters already set; returns (mean loss, seconds)."""
        # Seeded per (run seed, client, round): the same config gives the same update.
        generator = seed_everything(self.cfg.seed, self.partition_id, server_round)
        extra_loss = None
        if self.defense is not None:
            extra_loss = self.defense.extra_loss
            attack_step = after_step

            def after_step(model):  # the defense's edit (e.g. a mask) comes last: the server expects it held
                if attack_step is not None:
                    attack_step(model)
                self.defense.after_step(model)
        t0 = time.perf_counter()
        loss = train_local(self.model, self.x, self.y, self.data.spec, LocalTrainingConfig.from_cfg(self.cfg.local),
                           self.device, generator, batch_hook=batch_hook, extra_loss=extra_loss,
                           after_step=after_step)
        return loss, time.perf_counter() - t0

    def poison_hook(self, server_round: int):
        """The batch hook this client trains with in `server_round` (None: clean batches). Defenses'
        client halves use it to see the same (possibly poisoned) data the training sees."""
        return None

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        self.set_parameters(parameters)
        loss, seconds = self.train(int(config.get("server-round", 0)))
        return self.get_parameters({}), len(self.y), {"train-loss": loss, "train-seconds": seconds}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]):
        self.set_parameters(parameters)
        loss, acc = evaluate_loss_accuracy(self.model, self.x, self.y, self.data.spec, self.device)
        return loss, len(self.y), {"accuracy": acc}


class MaliciousClient(BenignClient):
    """In its attack rounds: poisons a share of every batch (trigger poison) and edits its model
    (model poison); in the other rounds it trains like a benign client."""

    in_attacker_pool = True

    def __init__(self, cfg: DictConfig, data: FederatedData, partition_id: int, device: torch.device,
                 state_keys: list[str], poison: TriggerPoison | None, model_poison: ModelPoison | None = None,
                 schedule: AttackSchedule | None = None, pool: frozenset[int] | None = None,
                 memory: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(cfg, data, partition_id, device, state_keys)
        self.poison = poison
        self.model_poison = model_poison or ModelPoison()
        self.schedule = schedule or AttackSchedule()
        self.pool = pool if pool is not None else frozenset({partition_id})
        self.memory = memory if memory is not None else {}  # persists across rounds (context.state)

    def batch_hook(self):
        if self.poison is None:
            return None

        def hook(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
            x, y, _ = self.poison.poison_batch(x, y, generator)
            return x, y
        return hook

    def attacks_in(self, server_round: int) -> bool:
        return self.partition_id in self.schedule.attackers(server_round, self.pool, int(self.cfg.seed))

    def poison_hook(self, server_round: int):
        return self.batch_hook() if self.attacks_in(server_round) else None

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
        server_round = int(config.get("server-round", 0))
        self.attacked = self.attacks_in(server_round)
        if not self.attacked:
            return super().fit(parameters, config)
        self.set_parameters(parameters)
        global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model_poison.before_training(global_state, self.memory)
        loss, seconds = self.train(server_round, batch_hook=self.batch_hook(),
                                   after_step=lambda model: self.model_poison.after_step(model, global_state))
        local_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        uploaded = self.model_poison.after_training(global_state, local_state)
        parameters_out = [uploaded[k].detach().cpu().numpy() for k in self.state_keys]
        return parameters_out, len(self.y), {"train-loss": loss, "train-seconds": seconds}
