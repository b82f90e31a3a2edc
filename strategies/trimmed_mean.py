"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498).

Rule: for each coordinate, drop the k = ⌊β·n⌋ largest and the k smallest of the n client values and
average the n - 2k that remain. β ∈ [0, 0.5) (β = 0 is the plain mean; n - 2k ≥ 1 always).

Defaults: β = 0.2 (`DEFAULT_BETA`; Flower's `FedTrimmedAvg` default too).

Same choices as `median.py`: trainable parameters only, computed on the updates; BatchNorm statistics
and integer buffers from the example-weighted FedAvg of all clients; reported weights uniform 1/n.

Flower's `FedTrimmedAvg` computes k as `int(beta * n)`, which is one too small when β·n is an integer
that floating point misses (0.29 · 100 = 28.999…); here k is ⌊β·n⌋ of β·n rounded to 9 decimals. The
two agree otherwise (tests/test_coordinatewise.py compares them on β = 0.2, n = 11).
"""

from __future__ import annotations

import math
from logging import WARNING

import torch
from flwr.common import log

from strategies.aggregation import StateDict, lane_trimmed_mean, lanes
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation
from strategies.median import coordinatewise_rule, reference_state, robust_state, uniform_weights

DEFAULT_BETA = 0.2  # β: fraction trimmed at each end of every coordinate


# ---- the math ------------------------------------------------------------------------------------
def check_beta(beta: float) -> None:
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"strategy.beta={beta} must satisfy 0 <= beta < 0.5 (the fraction trimmed at each end)")


def trimmed_count(n: int, beta: float) -> int:
    """k = ⌊β·n⌋: how many values are dropped at each end of a coordinate."""
    return math.floor(round(beta * n, 9))


def trimmed_mean(vectors: torch.Tensor, beta: float) -> torch.Tensor:
    """(n, d) -> (d,): per coordinate, the mean of the values left after dropping the ⌊β·n⌋ largest
    and the ⌊β·n⌋ smallest."""
    check_beta(beta)
    n = vectors.shape[0]
    k = trimmed_count(n, beta)
    if k == 0:
        return vectors.mean(dim=0)
    if vectors.is_cuda:
        return torch.sort(vectors, dim=0).values[k:n - k].mean(dim=0)
    return torch.from_numpy(lane_trimmed_mean(lanes(vectors), k))


# ---- the strategy --------------------------------------------------------------------------------
class TrimmedMeanStrategy(RobustAggregation):
    """Coordinate-wise β-trimmed mean of the client models (trainable parameters)."""

    def __init__(self, beta: float = DEFAULT_BETA, **kwargs) -> None:
        super().__init__(**kwargs)
        self.beta = float(beta)

    def check_preconditions(self, clients_per_round: int) -> None:
        check_beta(self.beta)
        if trimmed_count(clients_per_round, self.beta) == 0 and self.beta > 0:
            log(WARNING, "trimmed mean: strategy.beta=%s trims nothing with %d clients per round (plain mean)",
                self.beta, clients_per_round)

    def aggregate_updates(self, server_round: int, global_state: StateDict | None,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        reference = reference_state(global_state, updates)
        keys = self.keys_for_vectors(reference)
        mean = coordinatewise_rule(lambda block: trimmed_mean(block, self.beta), reference, updates, keys)
        return AggregationOutcome(state=robust_state(reference, keys, mean, updates),
                                  weights=uniform_weights(updates),
                                  info={"num_trimmed_each_end": float(trimmed_count(len(updates), self.beta))})
