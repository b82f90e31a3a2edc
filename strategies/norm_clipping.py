"""Norm clipping and weak differential privacy (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor
Federated Learning?", 2019, https://arxiv.org/abs/1911.07963).

Norm clipping: every client's update Delta_i = w_i - global (trainable parameters only) is scaled to
an L2 norm of at most M,

    Delta_i <- Delta_i * min(1, M / ||Delta_i||),

and the example-weighted mean of the clipped updates is added to the global model.

Weak DP: the same, then Gaussian noise N(0, sigma^2) is added to every coordinate of the aggregated
update. The noise is drawn from a generator seeded by (`seed`, round), so a run is reproducible and
a resumed run draws the same noise as an uninterrupted one.

Norms and noise cover the trainable parameters only; every other entry of the state dict (BatchNorm
running statistics, `num_batches_tracked`) comes from the example-weighted FedAvg of the clients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strategies.aggregation import StateDict, row_statistics, weighted_row_sum
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_weights, update_vectors
from strategies.median import robust_state

DEFAULTS: dict[str, Any] = {
    "norm_bound": 2.0,     # M: the largest L2 norm an update keeps
    "noise_std": 0.025,    # sigma: per-coordinate std of the Gaussian noise (weak DP only)
    "seed": 0,             # noise seed (weak DP only); the round is mixed in
}


def clip_scales(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """min(1, bound / |u_i|) per update norm (1 for a zero update): the factor that clips u_i to the bound."""
    return (bound / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)


def clipped_mean(updates: torch.Tensor, weights: torch.Tensor, bound: float, rows: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean (weights normalised here) of the updates clipped to L2 norm <= bound. The updates are the
    rows of updates[rows] - offset (e.g. the round's models and the global model); norms and the mean are
    float64 sums over column blocks, without a clipped copy of the matrix. Returns (mean (d,), norms before)."""
    squares, _ = row_statistics(updates, rows, offset)
    norms = squares.sqrt()
    w = weights.to(torch.float64)
    return weighted_row_sum(updates, (w / w.sum()) * clip_scales(norms, bound), rows, offset), norms


def gaussian_noise(numel: int, std: float, seed: int, server_round: int) -> torch.Tensor:
    """N(0, std^2) noise of length `numel` (float64), a pure function of (seed, round)."""
    round_seed = int(np.random.SeedSequence([int(seed), int(server_round)]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(round_seed)
    return torch.randn(numel, generator=generator, dtype=torch.float64) * std


class NormClippingStrategy(RobustAggregation):
    """Clip every update to L2 norm <= M (`norm_bound`), add the example-weighted mean to the global
    model (trainable parameters); other state-dict entries from the example-weighted FedAvg."""

    def __init__(self, norm_bound: float = DEFAULTS["norm_bound"], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norm_bound = float(norm_bound)

    def check_preconditions(self, clients_per_round: int) -> None:
        if not self.norm_bound > 0:
            raise ValueError(f"strategy.norm_bound={self.norm_bound!r} is invalid; allowed: norm_bound > 0")

    def perturb(self, server_round: int, aggregate: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Hook applied to the aggregated (clipped) update; plain clipping leaves it as is."""
        return aggregate, {}

    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        keys = self.keys_for_vectors(global_state)
        weights = example_weights(updates)
        models, reference = update_vectors(updates, keys, global_state)  # read-only
        mean, norms = clipped_mean(models, weights, self.norm_bound, offset=reference)
        mean, extra_info = self.perturb(server_round, mean)
        state = robust_state(global_state, keys, mean, updates)  # BatchNorm statistics: example-weighted FedAvg
        w = weights / weights.sum()
        info = {"norm_bound": self.norm_bound, "clipped": float((norms > self.norm_bound).sum()),
                "mean_norm": float(norms.mean()), "max_norm": float(norms.max()), **extra_info}
        return AggregationOutcome(state=state, weights={u.node_id: float(wi) for u, wi in zip(updates, w, strict=True)},
                                  info=info)


class WeakDPStrategy(NormClippingStrategy):
    """Norm clipping plus N(0, sigma^2) noise (`noise_std`) on every coordinate of the aggregated update,
    seeded by (`seed`, round)."""

    def __init__(self, norm_bound: float = DEFAULTS["norm_bound"], noise_std: float = DEFAULTS["noise_std"],
                 seed: int = DEFAULTS["seed"], **kwargs: Any) -> None:
        super().__init__(norm_bound=norm_bound, **kwargs)
        self.noise_std = float(noise_std)
        self.seed = int(seed)

    def check_preconditions(self, clients_per_round: int) -> None:
        super().check_preconditions(clients_per_round)
        if not self.noise_std >= 0:
            raise ValueError(f"strategy.noise_std={self.noise_std!r} is invalid; allowed: noise_std >= 0")
        if self.seed < 0:
            raise ValueError(f"strategy.seed={self.seed!r} is invalid; allowed: an integer >= 0")

    def perturb(self, server_round: int, aggregate: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        noise = gaussian_noise(aggregate.numel(), self.noise_std, self.seed, server_round)
        return aggregate + noise, {"noise_std": self.noise_std}
