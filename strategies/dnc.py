"""Divide-and-Conquer (DnC): spectral outlier filtering on random coordinate subsets.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses
for Federated Learning", NDSS 2021 (Algorithm 2, the DnC defense),
https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/

For the (n, d) matrix of updates u_i (local - global, trainable parameters only), repeat `niters`
times:

    r      = a random subset of b = `subsample_dim` coordinates (all d when d <= b)
    ū_r    = mean_i u_i[r]                 centre the sub-sampled updates
    v      = top right singular vector of the centred (n, b) matrix
    s_i    = ⟨u_i[r] - ū_r, v⟩²              outlier score
    good_k = the n - c·f clients with the lowest scores     c = `filter_frac`, f = `num_malicious`

The final good set is the intersection of the good_k; the others are rejected and the good ones are
averaged (the base class: example-weighted mean of the full state dicts).

thorn choices:
- c·f is rounded down when it is not an integer (the number of clients removed per iteration).
- If fewer replies arrive than planned so that n - c·f < 1, one client is kept per iteration.
- The subsets are drawn from a generator seeded by (`seed`, round), so runs are reproducible; score
  ties are broken by the (content-sorted) client order.
- The paper averages the good updates equally; thorn's anomaly-detection base weights them by example
  count (identical when the clients hold equally many examples).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from strategies.aggregation import StateDict, select_columns
from strategies.base import AnomalyDetection, ClientUpdate, update_vectors

# ---- defaults (the config keys, conf/strategy/dnc.yaml) -------------------------------------------
NITERS = 5               # iterations (random subsets)
SUBSAMPLE_DIM = 10000    # b: coordinates per subset
FILTER_FRAC = 1.0        # c: removes c·f clients per iteration
NUM_MALICIOUS = 3        # f: the number of malicious clients the server assumes
SEED = 0                 # seeds the subsets together with the round

_TAG = zlib.crc32(b"dnc")


# ---- the math (pure, vectorised over the (n, d) update matrix) -----------------------------------
def num_removed(filter_frac: float, num_malicious: int) -> int:
    """c·f rounded down (a small tolerance keeps e.g. 1.5·2 = 3)."""
    return max(int(math.floor(float(filter_frac) * int(num_malicious) + 1e-9)), 0)


def outlier_scores(sub: torch.Tensor) -> torch.Tensor:
    """s_i = ⟨x_i - μ, v⟩² with v the top right singular vector of the centred (n, b) matrix."""
    centred = sub.to(torch.float64) - sub.to(torch.float64).mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2


def dnc_good_mask(updates: torch.Tensor, niters: int, subsample_dim: int, n_remove: int,
                  generator: torch.Generator, rows: torch.Tensor | None = None,
                  offset: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (n,) of the clients kept in every iteration, for the rows of updates[rows] - offset. Every
    iteration's coordinates are drawn first and read in one pass (`select_columns`): no copy of the matrix."""
    n, d = (updates.shape[0] if rows is None else len(rows)), updates.shape[1]
    keep = max(n - n_remove, 1)
    good = torch.ones(n, dtype=torch.bool)
    subsets = [torch.arange(d) if subsample_dim >= d
               else torch.randperm(d, generator=generator)[:subsample_dim].sort().values for _ in range(niters)]
    columns = select_columns(updates, torch.cat(subsets), rows, offset)
    first = 0
    for subset in subsets:
        sub = columns[:, first:first + len(subset)]
        first += len(subset)
        order = torch.argsort(outlier_scores(sub), stable=True)
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order[:keep]] = True
        good &= chosen
    return good


def round_generator(seed: int, server_round: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(server_round), _TAG]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# ---- the strategy ---------------------------------------------------------------------------------
class DnCStrategy(AnomalyDetection):
    """DnC: reject the clients that score as spectral outliers on any random coordinate subset."""

    def __init__(self, niters: int = NITERS, subsample_dim: int = SUBSAMPLE_DIM, filter_frac: float = FILTER_FRAC,
                 num_malicious: int = NUM_MALICIOUS, seed: int = SEED, **kwargs) -> None:
        super().__init__(**kwargs)
        self.niters = int(niters)
        self.subsample_dim = int(subsample_dim)
        self.filter_frac = float(filter_frac)
        self.num_malicious = int(num_malicious)
        self.seed = int(seed)

    def check_preconditions(self, clients_per_round: int) -> None:
        if self.niters < 1:
            raise ValueError(f"strategy.niters={self.niters} is invalid; allowed: an integer >= 1")
        if self.subsample_dim < 1:
            raise ValueError(f"strategy.subsample_dim={self.subsample_dim} is invalid; allowed: an integer >= 1")
        if self.filter_frac < 0 or self.num_malicious < 0:
            raise ValueError(f"strategy.filter_frac={self.filter_frac} and strategy.num_malicious="
                             f"{self.num_malicious} must be >= 0")
        removed = num_removed(self.filter_frac, self.num_malicious)
        if clients_per_round - removed < 1:
            raise ValueError(f"strategy.num_malicious={self.num_malicious} (with strategy.filter_frac="
                             f"{self.filter_frac}) removes {removed} of {clients_per_round} clients per round; "
                             "allowed: clients per round - filter_frac * num_malicious >= 1")

    def detect(self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]) -> dict[int, str]:
        models, reference = update_vectors(updates, self.keys_for_vectors(global_state), global_state)
        n_remove = num_removed(self.filter_frac, self.num_malicious)
        generator = round_generator(self.seed, server_round)
        good = dnc_good_mask(models, self.niters, self.subsample_dim, n_remove, generator, offset=reference)
        return {u.node_id: "spectral outlier on a random coordinate subset (DnC)"
                for u, ok in zip(updates, good, strict=True) if not ok}
