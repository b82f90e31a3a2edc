"""Omniscient model-poisoning attacks: the math only (no Flower, no state).

Each function receives the benign clients' updates of the current round, `benign` of shape (n_b, d)
(one row per benign client: local - global, flattened), and returns the ONE update vector (d,) that
every malicious client sends.

Why these exist only in simulation: they need the other clients' updates of the SAME round (their
mean and spread) before the malicious clients reply. In a deployment a client never sees another
client's update: only the server receives them (and under secure aggregation not even the server
sees them individually), and the malicious replies would have to be computed after the benign ones
arrive. thorn therefore runs them server-side in simulation, rewriting the malicious replies before
aggregation; they model the worst case of an attacker that knows (or estimates perfectly) the benign
updates, as in the papers' threat models.

Attacks:
- A Little Is Enough (LIE): Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses
  For Distributed Learning", NeurIPS 2019, https://arxiv.org/abs/1902.06156.
  malicious = mean - z * std (coordinate-wise), with the paper's z: s = floor(n/2 + 1) - f
  (the number of benign clients the attackers need "on their side" for a majority),
  z = Phi^-1((n - s) / n), Phi the standard normal CDF, n the number of clients, f the malicious ones.
- Inner Product Manipulation (IPM): Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant
  SGD by Inner Product Manipulation", UAI 2019 (PMLR 115, 2020), https://arxiv.org/abs/1903.03936.
  malicious = -epsilon * mean, so that the inner product of the aggregate with the true mean turns
  negative when enough attackers collude.
- Min-Max: Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
  Defenses for Federated Learning", NDSS 2021. malicious = mean + gamma * p, with the largest gamma
  such that the malicious update is no farther from any benign update than the two most distant
  benign updates are from each other:
      max_i ||malicious - benign_i|| <= max_{i,j} ||benign_i - benign_j||.
  p is -std ("std"), -mean/||mean|| ("unit") or -sign(mean) ("sign").

What thorn chooses where the papers leave room:
- LIE's std is the population std (unbiased=False, divide by n_b): the attacker describes the
  observed benign updates themselves, not an estimate of a larger population. A computed z <= 0
  (e.g. f = 1: the attack would be the mean or move towards it) or an infinite z (f >= a majority)
  raises ValueError; pass `z` explicitly to override.
- Min-max's search is the paper's halving search: gamma starts at `gamma_init`, step = gamma_init/2;
  when the condition holds gamma += step, else gamma -= step; step /= 2; it stops when step < tol or
  after max_iter evaluations and returns the largest gamma at which the condition held (0 if none:
  gamma = 0, the mean, always satisfies it since the mean lies in the benign updates' convex hull).
  The search can therefore reach at most 2 * gamma_init. Distances are evaluated from precomputed
  inner products in float64, so one evaluation costs O(n_b) once the O(n_b * d) setup is done.
- For "unit" with a zero mean, p = 0 and the result is the mean.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

PERTURBATIONS = ("std", "unit", "sign")


def _check_benign(benign: torch.Tensor) -> torch.Tensor:
    if benign.ndim != 2 or benign.shape[0] < 1:
        raise ValueError(f"benign updates must be a (n_benign >= 1, d) matrix, got shape {tuple(benign.shape)}")
    return benign


def lie_z(num_clients: int, num_malicious: int) -> float:
    """The LIE paper's z: s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n). Raises if z is not > 0 and finite."""
    n, f = int(num_clients), int(num_malicious)
    if n < 1 or not 0 <= f <= n:
        raise ValueError(f"LIE needs 0 <= num_malicious <= num_clients and num_clients >= 1, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(f"LIE: z = Phi^-1((n - s)/n) = Phi^-1({p:.4g}) is infinite for n={n}, f={f} "
                         f"(s = floor(n/2 + 1) - f = {s}); pass z explicitly")
    z = NormalDist().inv_cdf(p)
    if not z > 0.0:
        raise ValueError(f"LIE: z = Phi^-1((n - s)/n) = {z:.4g} <= 0 for n={n}, f={f} (too few attackers for the "
                         "paper's z); pass z explicitly")
    return z


def lie_update(benign: torch.Tensor, num_clients: int, num_malicious: int, z: float | None = None) -> torch.Tensor:
    """A Little Is Enough: mean - z * std of the benign updates (coordinate-wise, population std)."""
    benign = _check_benign(benign)
    if z is None:
        z = lie_z(num_clients, num_malicious)
    elif not math.isfinite(float(z)):
        raise ValueError(f"LIE: z={z} must be finite")
    mean = benign.mean(0)
    std = benign.std(0, unbiased=False)
    return mean - float(z) * std


def ipm_update(benign: torch.Tensor, epsilon: float = 0.5) -> torch.Tensor:
    """Inner Product Manipulation: -epsilon * mean of the benign updates."""
    benign = _check_benign(benign)
    if not float(epsilon) > 0:
        raise ValueError(f"IPM: epsilon={epsilon} must be > 0")
    return -float(epsilon) * benign.mean(0)


def minmax_direction(benign: torch.Tensor, perturbation: str = "std") -> torch.Tensor:
    """The min-max perturbation p: -std, -mean/||mean|| ("unit") or -sign(mean)."""
    benign = _check_benign(benign)
    mean = benign.mean(0)
    if perturbation == "std":
        return -benign.std(0, unbiased=False)
    if perturbation == "unit":
        norm = torch.linalg.vector_norm(mean)
        return -mean / norm if float(norm) > 0 else torch.zeros_like(mean)
    if perturbation == "sign":
        return -torch.sign(mean)
    raise ValueError(f"min-max perturbation={perturbation!r} is unknown; allowed: {', '.join(PERTURBATIONS)}")


def max_pairwise_distance(benign: torch.Tensor) -> float:
    """max_{i,j} ||benign_i - benign_j||_2 (0 for a single row)."""
    best = 0.0
    for i in range(benign.shape[0] - 1):
        dists = torch.linalg.vector_norm((benign[i + 1:] - benign[i]).to(torch.float64), dim=1)
        best = max(best, float(dists.max()))
    return best


class _MinMaxObjective:
    """max_i ||mean + gamma * p - benign_i||^2 as a quadratic in gamma, from precomputed inner products."""

    def __init__(self, benign: torch.Tensor, direction: torch.Tensor) -> None:
        centred = (benign.mean(0) - benign).to(torch.float64)  # (n_b, d): mean - benign_i
        p = direction.to(torch.float64)
        self.a = (centred ** 2).sum(1)  # ||mean - b_i||^2
        self.b = centred @ p  # <mean - b_i, p>
        self.c = float(p @ p)  # ||p||^2
        self.threshold_sq = max_pairwise_distance(benign) ** 2

    def max_sq_distance(self, gamma: float) -> float:
        return float((self.a + 2.0 * gamma * self.b + gamma * gamma * self.c).max())

    def holds(self, gamma: float) -> bool:
        return self.max_sq_distance(gamma) <= self.threshold_sq


def minmax_gamma(benign: torch.Tensor, perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5,
                 max_iter: int = 200) -> float:
    """The largest gamma found by the paper's halving search with max_i ||mean + gamma p - b_i|| <=
    max_{i,j} ||b_i - b_j||."""
    if not float(gamma_init) > 0 or not float(tol) > 0 or int(max_iter) < 1:
        raise ValueError(f"min-max: gamma_init={gamma_init} and tol={tol} must be > 0, max_iter={max_iter} >= 1")
    objective = _MinMaxObjective(_check_benign(benign), minmax_direction(benign, perturbation))
    gamma, step, best = float(gamma_init), float(gamma_init) / 2.0, 0.0
    for _ in range(int(max_iter)):
        if objective.holds(gamma):
            best = max(best, gamma)
            gamma += step
        else:
            gamma -= step
        step /= 2.0
        if abs(step) < tol:
            break
    return best


def minmax_update(benign: torch.Tensor, perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5,
                  max_iter: int = 200) -> torch.Tensor:
    """Min-Max: mean + gamma * p with gamma from `minmax_gamma`."""
    gamma = minmax_gamma(benign, perturbation, gamma_init, tol, max_iter)
    return benign.mean(0) + gamma * minmax_direction(benign, perturbation)
