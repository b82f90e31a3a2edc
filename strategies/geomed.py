"""GeoMed / RFA: the weighted geometric median of the client models (Pillutla, Kakade, Harchaoui,
"Robust Aggregation for Federated Learning", IEEE Transactions on Signal Processing 2022,
https://arxiv.org/abs/1912.13445).

The aggregate is the point v minimising sum_i alpha_i * ||v - w_i|| over the client parameter vectors
w_i, with alpha_i the example counts (normalised). RFA computes it with the smoothed Weiszfeld
algorithm: starting from the weighted mean,

    beta_i <- alpha_i / max(nu, ||v - w_i||),        v <- sum_i beta_i w_i / sum_i beta_i,

until the objective's relative change falls below `tol` or after `max_iter` iterations. The smoothing
nu keeps a weight finite when v lands on a client's point.

The geometric median is translation-equivariant, so it is computed on the updates w_i - global (same
result, better conditioned in floating point) and added to the global model. Only the trainable
parameters go into the vectors; every other entry of the state dict (BatchNorm running statistics,
`num_batches_tracked`) comes from the example-weighted FedAvg of the clients.
"""

from __future__ import annotations

from typing import Any

import torch

from strategies.aggregation import StateDict, apply_update, row_statistics, weighted_average_states, weighted_row_sum
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_weights, update_vectors

DEFAULTS: dict[str, Any] = {
    "max_iter": 10,   # Weiszfeld iterations at most
    "nu": 1e-6,       # smoothing nu: distances below it count as nu
    "tol": 1e-5,      # stop when |objective change| <= tol * objective
}


def geomed_objective(points: torch.Tensor, alphas: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i alpha_i ||v - points_i|| (alphas as given)."""
    return (alphas * torch.linalg.vector_norm(points - v, dim=1)).sum()


def geometric_median(points: torch.Tensor, alphas: torch.Tensor, max_iter: int = DEFAULTS["max_iter"],
                     nu: float = DEFAULTS["nu"], tol: float = DEFAULTS["tol"], rows: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Smoothed Weiszfeld on an (n, d) matrix of points with non-negative weights `alphas` (n,); the
    points are points[rows] - offset when given (client models minus the global model).

    Returns (median (d,) float64, beta (n,) normalised so that median = beta @ points, iterations used).
    The stopping rule uses the unsmoothed objective sum_i alpha_i ||v - w_i|| (alphas normalised).
    Every step is a weighted sum of the rows or their distances to v, accumulated over column blocks in
    float64 (aggregation.weighted_row_sum / row_statistics): no float64 copy of the points, no (n, d)
    difference matrix."""
    a = alphas.to(torch.float64)
    a = a / a.sum()
    base = offset.to(torch.float64) if offset is not None else None

    def distances(v: torch.Tensor) -> torch.Tensor:  # ||points_i - offset - v|| for every i
        squares, _ = row_statistics(points, rows, v if base is None else base + v)
        return squares.clamp_min(0).sqrt()

    v = weighted_row_sum(points, a, rows, offset)
    beta = a
    dist = distances(v)
    objective = (a * dist).sum()
    iterations = 0
    for _ in range(max_iter):
        beta = a / dist.clamp_min(nu)
        beta = beta / beta.sum()
        v = weighted_row_sum(points, beta, rows, offset)
        iterations += 1
        dist = distances(v)
        new_objective = (a * dist).sum()
        converged = bool((objective - new_objective).abs() <= tol * new_objective)
        objective = new_objective
        if converged:
            break
    return v, beta, iterations


class GeoMedStrategy(RobustAggregation):
    """RFA: the example-weighted geometric median of the client models (trainable parameters);
    other state-dict entries from the example-weighted FedAvg. Record weights: the final beta."""

    def __init__(self, max_iter: int = DEFAULTS["max_iter"], nu: float = DEFAULTS["nu"],
                 tol: float = DEFAULTS["tol"], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_iter = int(max_iter)
        self.nu = float(nu)
        self.tol = float(tol)

    def check_preconditions(self, clients_per_round: int) -> None:
        if self.max_iter < 1:
            raise ValueError(f"strategy.max_iter={self.max_iter!r} is invalid; allowed: an integer >= 1")
        if not self.nu > 0:
            raise ValueError(f"strategy.nu={self.nu!r} is invalid; allowed: nu > 0")
        if not self.tol >= 0:
            raise ValueError(f"strategy.tol={self.tol!r} is invalid; allowed: tol >= 0")

    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        keys = self.keys_for_vectors(global_state)
        alphas = example_weights(updates)
        models, reference = update_vectors(updates, keys, global_state)  # read-only
        median, beta, iterations = geometric_median(models, alphas, self.max_iter, self.nu, self.tol,
                                                    offset=reference)
        buffers = weighted_average_states([u.state for u in updates], alphas)
        state = apply_update(global_state, median, keys, buffers_from=buffers)
        squares, _ = row_statistics(models, offset=reference.to(torch.float64) + median)
        objective = float((alphas / alphas.sum() * squares.clamp_min(0).sqrt()).sum())
        return AggregationOutcome(
            state=state, weights={u.node_id: float(b) for u, b in zip(updates, beta, strict=True)},
            info={"iterations": float(iterations), "objective": objective})
