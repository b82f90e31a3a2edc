"""Model replacement by scaling (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated
Learning", AISTATS 2020, https://arxiv.org/abs/1807.00459).

The malicious client trains its backdoored model L from the global model G as usual and uploads

    X = G + gamma * (L - G).

With FedAvg over n clients and a server learning rate eta, the new global model is
G + (eta / n) * sum_i (X_i - G); choosing gamma = n / eta (the paper's scale factor) makes the
attacker's contribution alone equal L - G, so if the benign updates roughly cancel, the aggregate is
(approximately) replaced by L. `gamma` may also be given explicitly (e.g. a smaller factor that stays
under a norm-clipping threshold).

What thorn infers where the paper is silent:
- The scaling applies to every floating-point entry of the state dict, BatchNorm running statistics
  (`running_mean`, `running_var`) included, so that after FedAvg the global running statistics are
  replaced along with the weights. A single scaled upload can therefore carry a negative
  `running_var`; the FedAvg aggregate is the intended quantity, not the upload on its own.
- Integer entries (BatchNorm `num_batches_tracked`) are passed through unchanged from the local state.
- Default gamma = num_clients / server_lr uses the configured total number of clients (the config
  interpolates `${num_clients}`); with partial participation the paper's n is the number of clients
  aggregated per round, so pass `gamma` explicitly in that case.
"""

from __future__ import annotations

import torch

from attacks.base import ModelPoison, StateDict


class Scaling(ModelPoison):
    """Upload G + gamma * (L - G); gamma defaults to num_clients / server_lr (the paper's n / eta)."""

    def __init__(self, gamma: float | None = None, num_clients: int | None = None, server_lr: float = 1.0) -> None:
        if server_lr is None or float(server_lr) <= 0:
            raise ValueError(f"attack.model_poison.server_lr={server_lr} must be > 0")
        if gamma is None:
            if num_clients is None:
                raise ValueError("attack.model_poison: set gamma, or num_clients (gamma = num_clients / server_lr)")
            if int(num_clients) < 1:
                raise ValueError(f"attack.model_poison.num_clients={num_clients} must be >= 1")
            gamma = int(num_clients) / float(server_lr)
        self.gamma = float(gamma)
        self.num_clients = None if num_clients is None else int(num_clients)
        self.server_lr = float(server_lr)

    def after_training(self, global_state: StateDict, local_state: StateDict) -> StateDict:
        out: StateDict = {}
        for key, local in local_state.items():
            if torch.is_floating_point(local):
                g = global_state[key].to(device=local.device, dtype=local.dtype)
                out[key] = g + self.gamma * (local - g)
            else:
                out[key] = local  # num_batches_tracked and other integer buffers: unchanged
        return out

    def __repr__(self) -> str:
        return f"Scaling(gamma={self.gamma}, num_clients={self.num_clients}, server_lr={self.server_lr})"
