"""Omniscient attacks (LIE, IPM, min-max) against hand-computed numbers.

The running example: three benign updates b1 = (1, 2), b2 = (3, 4), b3 = (5, 0).
- mean = (9/3, 6/3) = (3, 2)
- population std per coordinate: deviations (-2, 0, 2) and (0, 2, -2), variance 8/3 each,
  std = sqrt(8/3) = 1.6329931618554521 on both coordinates
- pairwise distances: |b1-b2| = sqrt(4+4) = sqrt(8), |b1-b3| = sqrt(16+4) = sqrt(20),
  |b2-b3| = sqrt(4+16) = sqrt(20) -> threshold sqrt(20)
"""

from __future__ import annotations

import math

import pytest
import torch

from attacks.omniscient import ipm_update, lie_update, lie_z, minmax_gamma, minmax_update

BENIGN = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]], dtype=torch.float64)
STD = math.sqrt(8.0 / 3.0)  # 1.6329931618554521
THRESHOLD = math.sqrt(20.0)


def max_distance(update: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(BENIGN - update, dim=1).max())


# ---- LIE -------------------------------------------------------------------------------------------

def test_lie_z_for_ten_clients_three_malicious():
    # s = floor(10/2 + 1) - 3 = 6 - 3 = 3; (n - s)/n = 7/10; Phi^-1(0.7) = 0.5244005127...
    assert lie_z(10, 3) == pytest.approx(0.5244005127080407, abs=1e-12)


def test_lie_with_the_papers_z_on_the_hand_example():
    # n = 5, f = 2: s = floor(5/2 + 1) - 2 = floor(3.5) - 2 = 1; (5 - 1)/5 = 0.8; Phi^-1(0.8) = 0.8416212335729143
    z = 0.8416212335729143
    assert lie_z(5, 2) == pytest.approx(z, abs=1e-12)
    out = lie_update(BENIGN, num_clients=5, num_malicious=2)
    expected = torch.tensor([3.0 - z * STD, 2.0 - z * STD], dtype=torch.float64)  # (1.62563..., 0.62563...)
    assert torch.allclose(out, expected, atol=1e-12)
    assert out.shape == (2,)


def test_lie_with_an_explicit_z():
    out = lie_update(BENIGN, num_clients=5, num_malicious=2, z=1.0)
    assert torch.allclose(out, torch.tensor([3.0 - STD, 2.0 - STD], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(("n", "f"), [(10, 1), (10, 0), (10, 6), (10, 11)])
def test_lie_rejects_a_z_that_is_not_positive_and_finite(n, f):
    # (10, 1): s = 5, Phi^-1(0.5) = 0; (10, 0): Phi^-1(0.4) < 0; (10, 6): s = 0, Phi^-1(1) = inf
    with pytest.raises(ValueError, match="LIE"):
        lie_z(n, f)
    with pytest.raises(ValueError, match="LIE"):
        lie_update(BENIGN, n, f)


# ---- IPM -------------------------------------------------------------------------------------------

def test_ipm_is_minus_epsilon_times_the_mean():
    assert torch.allclose(ipm_update(BENIGN), torch.tensor([-1.5, -1.0], dtype=torch.float64))
    assert torch.allclose(ipm_update(BENIGN, epsilon=2.0), torch.tensor([-6.0, -4.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        ipm_update(BENIGN, epsilon=0.0)


# ---- Min-max -----------------------------------------------------------------------------------------

def test_minmax_std_on_the_hand_example():
    # malicious = (3 - t, 2 - t) with t = gamma * std. Squared distances:
    #   to b1: (2-t)^2 + t^2,  to b2: t^2 + (2+t)^2 = 2t^2 + 4t + 4,  to b3: (2+t)^2 + (2-t)^2 = 2t^2 + 8.
    # For t > 1 the b2 term is the largest; 2t^2 + 4t + 4 <= 20 <=> (t + 4)(t - 2) <= 0 <=> t <= 2.
    # So t* = 2, gamma* = 2 / sqrt(8/3) = sqrt(3/2) = 1.2247448713915890, malicious = (1, 0).
    gamma = minmax_gamma(BENIGN, "std", tol=1e-9)
    assert gamma == pytest.approx(math.sqrt(1.5), abs=1e-7)
    out = minmax_update(BENIGN, "std", tol=1e-9)
    assert torch.allclose(out, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-7)


def test_minmax_sign_on_the_hand_example():
    # -sign(mean) = (-1, -1): malicious = (3 - gamma, 2 - gamma), the same geometry with t = gamma -> gamma* = 2.
    assert minmax_gamma(BENIGN, "sign", tol=1e-9) == pytest.approx(2.0, abs=1e-7)
    assert torch.allclose(minmax_update(BENIGN, "sign", tol=1e-9), torch.tensor([1.0, 0.0], dtype=torch.float64),
                          atol=1e-7)


def test_minmax_unit_on_the_hand_example():
    # p = -(3, 2)/sqrt(13); malicious = c * (3, 2) with c = 1 - gamma/sqrt(13). Squared distances:
    #   to b1: 13c^2 - 14c + 5,  to b2: 13c^2 - 34c + 25,  to b3: 13c^2 - 30c + 25.
    # For 0 <= c <= 1 the b3 term is the largest; 13c^2 - 30c + 25 <= 20 <=> 13c^2 - 30c + 5 <= 0
    # <=> c >= (30 - sqrt(640))/26 = (15 - 4 sqrt(10))/13 = 0.18083764...; for c < 0 the b2 term exceeds 25.
    c = (15.0 - 4.0 * math.sqrt(10.0)) / 13.0
    gamma_star = math.sqrt(13.0) * (1.0 - c)  # 2.9535318810...
    assert minmax_gamma(BENIGN, "unit", tol=1e-9) == pytest.approx(gamma_star, abs=1e-7)
    out = minmax_update(BENIGN, "unit", tol=1e-9)
    assert torch.allclose(out, torch.tensor([3.0 * c, 2.0 * c], dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_minmax_gamma_is_optimal_within_tol(perturbation):
    tol = 1e-5
    gamma = minmax_gamma(BENIGN, perturbation, tol=tol)
    mean = BENIGN.mean(0)
    direction = {"std": -BENIGN.std(0, unbiased=False), "unit": -mean / mean.norm(), "sign": -torch.sign(mean)}
    p = direction[perturbation]
    assert max_distance(mean + gamma * p) <= THRESHOLD + 1e-12
    assert max_distance(mean + (gamma + 4 * tol) * p) > THRESHOLD


def test_minmax_condition_holds_on_random_updates():
    gen = torch.Generator().manual_seed(0)
    benign = torch.randn(7, 50, generator=gen, dtype=torch.float64)
    out = minmax_update(benign, "std")
    pairwise = torch.cdist(benign, benign).max()
    assert float(torch.linalg.vector_norm(benign - out, dim=1).max()) <= float(pairwise) + 1e-9
    gamma = minmax_gamma(benign, "std")
    assert gamma > 0
    worse = benign.mean(0) - (gamma + 1e-3) * benign.std(0, unbiased=False)
    assert float(torch.linalg.vector_norm(benign - worse, dim=1).max()) > float(pairwise)


def test_minmax_rejects_unknown_perturbation_and_bad_input():
    with pytest.raises(ValueError, match="perturbation"):
        minmax_update(BENIGN, "nope")
    with pytest.raises(ValueError):
        minmax_update(torch.zeros(0, 3))
