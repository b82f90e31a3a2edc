"""RLR: robust learning rate (Ozdayi, Kantarcioglu, Gel, "Defending against Backdoors in Federated
Learning with Robust Learning Rate", AAAI 2021, https://arxiv.org/abs/2007.03767).

Per coordinate k of the trainable parameters, the server counts how much the clients agree on the
update's direction, |sum_i sign(Delta_i[k])|. Where the agreement reaches the threshold theta the
server learning rate is +eta, elsewhere -eta (the step is reversed, moving away from a direction only
a few clients push):

    lr[k] = +eta if |sum_i sign(Delta_i[k])| >= theta else -eta,
    new   = global + lr * (example-weighted mean of the Delta_i).

The sign count is unweighted (one vote per client), as in the paper. The paper sets theta per task,
above the number of corrupt agents: theta = 4 for its Fashion-MNIST setup (10 agents, 1 corrupt),
theta = 8 for CIFAR-10 (40 agents, 4 corrupt) and for federated EMNIST; thorn's default of 4 fits its
default 10 clients per round. Coordinates on which every client's update is zero count as flipped
(agreement 0 < theta), as the rule says; their step is zero either way.

Only the trainable parameters are stepped this way; every other entry of the state dict (BatchNorm
running statistics, `num_batches_tracked`) comes from the example-weighted FedAvg of the clients.
"""

from __future__ import annotations

from typing import Any

import torch

from strategies.aggregation import COLUMN_BLOCK, Float64Blocks, StateDict, row_block
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_weights, update_vectors
from strategies.median import robust_state

DEFAULTS: dict[str, Any] = {
    "threshold": 4,     # theta: the sign agreement a coordinate needs to keep +eta
    "server_lr": 1.0,   # eta: the server learning rate
}


def robust_learning_rate(updates: torch.Tensor, threshold: float, server_lr: float) -> torch.Tensor:
    """Per-coordinate learning rate (d,) float64 for an (n, d) update matrix: +eta where
    |sum_i sign(updates[i])| >= threshold, else -eta."""
    agreement = torch.sign(updates).sum(dim=0).abs()
    eta = torch.tensor(float(server_lr), dtype=torch.float64)
    return torch.where(agreement >= threshold, eta, -eta)


def rlr_step(updates: torch.Tensor, weights: torch.Tensor, threshold: float, server_lr: float,
             rows: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The server step lr * (weighted mean of the updates), (d,) float64, and how many coordinates got -eta.
    The updates are the rows of updates[rows] - offset; the vote and the mean are taken per column block in
    float64 (the same per coordinate as on the whole matrix, without a float64 copy of it)."""
    w = weights.to(torch.float64)
    w = w / w.sum()
    step = torch.empty(updates.shape[1], dtype=torch.float64, device=updates.device)
    flipped = 0
    as_float64 = Float64Blocks()
    for start in range(0, updates.shape[1], COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, updates.shape[1])
        block = as_float64(row_block(updates, rows, start, end), None if offset is None else offset[start:end])
        lr = robust_learning_rate(block, threshold, server_lr)
        step[start:end] = lr * (w @ block)
        flipped += int((lr < 0).sum())
    return step, flipped


class RLRStrategy(RobustAggregation):
    """Robust learning rate: -eta (`server_lr`) on coordinates whose sign agreement is below theta
    (`threshold`), +eta elsewhere, applied to the example-weighted mean update."""

    def __init__(self, threshold: float = DEFAULTS["threshold"], server_lr: float = DEFAULTS["server_lr"],
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold if isinstance(threshold, int) else float(threshold)
        self.server_lr = float(server_lr)

    def check_preconditions(self, clients_per_round: int) -> None:
        if not 0 <= self.threshold <= clients_per_round:
            raise ValueError(f"strategy.threshold={self.threshold!r} is invalid; allowed: 0 <= strategy.threshold "
                             f"<= {clients_per_round} (the clients per round; above it every coordinate is flipped)")
        if not self.server_lr > 0:
            raise ValueError(f"strategy.server_lr={self.server_lr!r} is invalid; allowed: server_lr > 0")

    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        keys = self.keys_for_vectors(global_state)
        weights = example_weights(updates)
        models, reference = update_vectors(updates, keys, global_state)  # read-only
        step, flipped = rlr_step(models, weights, self.threshold, self.server_lr, offset=reference)
        state = robust_state(global_state, keys, step, updates)  # BatchNorm statistics: example-weighted FedAvg
        w = weights / weights.sum()
        return AggregationOutcome(
            state=state, weights={u.node_id: float(wi) for u, wi in zip(updates, w, strict=True)},
            info={"flipped": float(flipped), "flipped_fraction": flipped / max(step.numel(), 1),
                  "threshold": float(self.threshold)})
