"""FLTrust, FLAME and DnC: the pure math on hand-made updates, and one Flower round each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flower_messages import run_round as shared_run_round
from torch import nn

from server.app import build_strategy
from strategies.aggregation import flatten_states, unflatten_vector
from strategies.base import ServerContext
from strategies.dnc import DnCStrategy, dnc_good_mask, num_removed, outlier_scores
from strategies.flame import (
    FlameStrategy,
    clip_factors,
    flame_update,
    majority_cluster,
    median_norm,
    minimum_spanning_tree,
    pairwise_cosine_distances,
)
from strategies.fltrust import FLTrustStrategy, fltrust_aggregate, magnitude_factors, trust_scores
from task.config import compose_config
from task.data import InputSpec
from task.train import LocalTrainingConfig

KEYS = ["fc.weight", "fc.bias"]


# ---- Flower plumbing ------------------------------------------------------------------------------
def run_round(strategy, global_state: dict, states: dict[int, dict], num_examples: int = 10, server_round: int = 1):
    return shared_run_round(strategy, [(node, s, num_examples) for node, s in states.items()], global_state,
                            server_round)


def linear_state(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2x8 linear layer's state from a 18-vector."""
    return {"fc.weight": vector[:16].reshape(2, 8).clone(), "fc.bias": vector[16:18].clone()}


def vec(state: dict) -> torch.Tensor:
    return flatten_states([state], KEYS)[0]


# ---- FLTrust ---------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def tiny_context(seed: int = 0) -> ServerContext:
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.integers(0, 50, size=(40, 4, 4, 1)).astype(np.uint8)
    x[y == 1, :2] = 230  # class 1: bright top half
    return ServerContext(x_val=x, y_val=y.astype(np.int64), spec=InputSpec(mean=(0.5,), std=(0.5,), image_size=4,
                                                                           channels=1),
                         build_model=TinyNet, device=torch.device("cpu"),
                         local=LocalTrainingConfig(epochs=1, lr=0.1, batch_size=8), seed=seed)


def dense_trust_scores(updates: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """The paper's TS_i = ReLU(cos(g_i, g0)) on a whole matrix (the reference the block-wise code must meet)."""
    norms = updates.norm(dim=1) * g0.norm()
    return torch.relu(torch.where(norms > 0, (updates @ g0) / norms.clamp_min(1e-300), torch.zeros_like(norms)))


def dense_normalised(updates: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """ĝ_i = g_i · ‖g0‖/‖g_i‖ on a whole matrix (a zero update stays zero)."""
    norms = updates.norm(dim=1, keepdim=True)
    return updates * torch.where(norms > 0, target_norm / norms.clamp_min(1e-300), torch.zeros_like(norms))


def test_fltrust_math_on_hand_made_vectors():
    g0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    updates = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    norms = updates.norm(dim=1)
    assert torch.allclose(trust_scores(updates @ g0, norms, g0.norm()), torch.tensor([0.6, 0.0, 0.0],
                                                                                     dtype=torch.float64))
    assert torch.allclose(magnitude_factors(norms, g0.norm()) * norms, torch.full((3,), 2.0, dtype=torch.float64))
    assert magnitude_factors(torch.zeros(1, dtype=torch.float64), g0.norm()).tolist() == [0.0]
    aggregate, _ = fltrust_aggregate(updates, g0)
    assert torch.allclose(aggregate, torch.tensor([1.2, 1.6], dtype=torch.float64))
    # two trusted clients: (0.6 * [0.6, 0.8] + 1 * [1, 0]) / 1.6 with g0 = [1, 0]
    aggregate, ts = fltrust_aggregate(torch.tensor([[3.0, 4.0], [5.0, 0.0]]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(ts, torch.tensor([0.6, 1.0])) and torch.allclose(aggregate, torch.tensor([0.85, 0.3]))
    assert fltrust_aggregate(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0]))[0] is None


def test_fltrust_round_zero_trust_for_an_opposing_client_and_norms_of_g0(flower_task_identity):
    torch.manual_seed(0)
    global_state = TinyNet().state_dict()
    strategy = FLTrustStrategy(server_lr=1.0)
    strategy.server_context = tiny_context()
    rng_before = torch.get_rng_state()
    server_state = strategy.server_model(1, global_state)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the server's RNG stream is untouched
    assert all(torch.equal(server_state[k], strategy.server_model(1, global_state)[k]) for k in KEYS)  # seeded
    g = flatten_states([global_state], KEYS)[0]
    g0 = flatten_states([server_state], KEYS)[0] - g
    assert g0.norm() > 0
    perp = torch.randn(g0.shape, generator=torch.Generator().manual_seed(1))
    perp = perp - (perp @ g0) / (g0 @ g0) * g0
    perp = perp / perp.norm() * g0.norm()
    updates = {11: 3.0 * g0, 12: -2.0 * g0, 13: 0.5 * g0 + 0.5 * perp}  # cos = 1, -1, 1/sqrt(2)
    states = {n: unflatten_vector(g + u, global_state, KEYS) for n, u in updates.items()}
    out = run_round(strategy, global_state, states)
    report = strategy.last_report
    ts13 = 1 / math.sqrt(2)
    assert report.weights[12] == 0.0 and 12 in report.rejected and set(report.rejected) == {12}
    assert report.weights[11] == pytest.approx(1 / (1 + ts13), rel=1e-5)
    assert report.weights[13] == pytest.approx(ts13 / (1 + ts13), rel=1e-5)
    expected = (1.0 * g0 + ts13 * (g0 + perp) / math.sqrt(2)) / (1 + ts13)  # both rescaled to ||g0||
    assert torch.allclose(vec(out) - g, expected, atol=1e-5)
    # magnitudes: a single trusted client 3 g0 moves the model by exactly g0
    out = run_round(strategy, global_state, {11: states[11], 12: states[12]})
    assert torch.allclose(vec(out) - g, g0, atol=1e-5)
    assert report.info["all_trust_zero"] == 0.0


def test_fltrust_all_distrusted_keeps_the_global_model(flower_task_identity):
    torch.manual_seed(0)
    global_state = TinyNet().state_dict()
    strategy = FLTrustStrategy()
    strategy.server_context = tiny_context()
    g = vec(global_state)
    g0 = vec(strategy.server_model(1, global_state)) - g
    states = {n: unflatten_vector(g - k * g0, global_state, KEYS) for n, k in ((21, 1.0), (22, 2.0))}
    assert run_round(strategy, global_state, states) is None
    assert strategy.last_report.skipped and strategy.last_report.info["all_trust_zero"] == 1.0
    assert set(strategy.last_report.rejected) == {21, 22}


def test_fltrust_preconditions_name_the_key():
    with pytest.raises(ValueError, match="strategy.root_epochs"):
        FLTrustStrategy(root_epochs=0).check_preconditions(10)
    assert FLTrustStrategy.needs_server_data


# ---- FLAME ------------------------------------------------------------------------------------------
def line_distances(points: list[float]) -> torch.Tensor:
    p = torch.tensor(points, dtype=torch.float64)
    return (p[:, None] - p[None, :]).abs()


def test_mst_and_majority_cluster_on_points_on_a_line():
    dist = line_distances([0, 1, 2, 3, 10, 11, 20])
    mst = minimum_spanning_tree(dist)
    assert len(mst) == 6 and sum(w for *_, w in mst) == pytest.approx(20.0)
    # min_cluster_size 4: cutting 9 then 7 keeps {0,1,2,3}; cutting the 1s would leave singletons
    assert majority_cluster(dist, 4).tolist() == [True] * 4 + [False] * 3
    assert majority_cluster(line_distances([0, 1, 2, 3, 4]), 3).all()  # equal edges dissolve together
    assert majority_cluster(line_distances([0.0]), 1).tolist() == [True]


def test_majority_cluster_matches_hdbscan_on_a_random_case():
    # expected labels from scikit-learn 1.9.1 HDBSCAN(metric="precomputed", min_cluster_size=6,
    # min_samples=1, allow_single_cluster=True) on the same matrix (computed once, outside the repo)
    x = torch.randn(11, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.8
    mask = majority_cluster(pairwise_cosine_distances(x), 11 // 2 + 1)
    assert mask.int().tolist() == [1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0]


def test_median_norm_and_clip_factors():
    updates = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert float(median_norm(updates.norm(dim=1))) == pytest.approx(2.5)
    norms = updates.norm(dim=1).double()
    assert torch.allclose(clip_factors(norms, 2.5), torch.tensor([1.0, 1.0, 2.5 / 3, 0.25], dtype=torch.float64))


def flame_states(global_vec: torch.Tensor, noise: float = 0.0, wild_bn: bool = True) -> dict[int, dict]:
    """7 benign models along one direction (different norms), 3 along another; with noise=0 each group has
    cosine distance 0 inside, so HDBSCAN's majority cluster is exactly the 7."""
    gen = torch.Generator().manual_seed(0)
    benign_dir = torch.ones(18)
    evil_dir = torch.cat([torch.ones(9), -torch.ones(9)])
    states = {}
    for i in range(10):
        direction, scale = (benign_dir, 1.0 + 0.5 * i) if i < 7 else (evil_dir, 5.0)
        u = scale * direction + noise * torch.randn(18, generator=gen)
        s = linear_state(global_vec + u)
        s["bn.running_mean"] = torch.zeros(3)
        s["bn.num_batches_tracked"] = torch.tensor(i)
        states[100 + i] = s
    if wild_bn:
        states[100]["bn.running_mean"] = torch.tensor([1e6, -3e6, 7e5])  # wild statistics on a benign client
    return states


def flame_global() -> dict:
    s = linear_state(torch.zeros(18))
    s["bn.running_mean"] = torch.zeros(3)
    s["bn.num_batches_tracked"] = torch.tensor(0)
    return s


def test_flame_rejects_the_deviating_models_and_clips_to_the_median(flower_task_identity):
    g_state = flame_global()
    g = vec(g_state)
    states = flame_states(g)
    strategy = FlameStrategy(noise_lambda=0.0)
    out = run_round(strategy, g_state, states)
    report = strategy.last_report
    assert set(report.rejected) == {107, 108, 109}          # the client with wild BN statistics is admitted
    assert report.weights[100] == pytest.approx(1 / 7) and report.weights[108] == 0.0
    updates = torch.stack([vec(s) for s in states.values()]).double() - g.double()
    norms = updates.norm(dim=1)                              # (1, 1.5, .., 4) * sqrt(18), and 5 * sqrt(18) x3
    bound = float(norms.sort().values[4:6].mean())           # median of 10 = mean of the 5th and 6th
    assert bound == pytest.approx(3.25 * math.sqrt(18))
    assert report.info["clip_bound"] == pytest.approx(bound) and report.info["n_admitted"] == 7.0
    gamma = torch.clamp(bound / norms[:7], max=1.0)
    assert report.info["n_clipped"] == 2.0                   # the admitted ones above the bound: 3.5 and 4
    expected = (updates[:7] * gamma[:, None]).mean(0)
    assert torch.allclose(vec(out) - g, expected.float(), atol=1e-5)
    assert out["bn.running_mean"].tolist() == pytest.approx((torch.tensor([1e6, -3e6, 7e5]) / 7).tolist())
    assert out["bn.num_batches_tracked"].item() == 6


def test_flame_bn_statistics_do_not_move_the_clustering(flower_task_identity):
    g_state = flame_global()
    rejected = []
    for wild in (False, True):
        strategy = FlameStrategy(noise_lambda=0.0)
        run_round(strategy, g_state, flame_states(vec(g_state), noise=0.3, wild_bn=wild))
        rejected.append(set(strategy.last_report.rejected))
    assert rejected[0] == rejected[1] and {107, 108, 109} <= rejected[1] and len(rejected[1]) <= 4


def test_flame_noise_is_reproducible_and_scaled_by_lambda_times_the_bound(flower_task_identity):
    g_state = flame_global()
    states = flame_states(vec(g_state))
    runs = [run_round(FlameStrategy(noise_lambda=0.01, seed=s), g_state, states) for s in (3, 3, 4)]
    assert torch.equal(runs[0]["fc.weight"], runs[1]["fc.weight"])
    assert not torch.equal(runs[0]["fc.weight"], runs[2]["fc.weight"])
    assert torch.equal(runs[0]["bn.running_mean"], runs[2]["bn.running_mean"])  # no noise on BN statistics
    # the noise alone, on a wide matrix: std = lambda * S_t
    updates = torch.randn(5, 20000, generator=torch.Generator().manual_seed(0))
    admitted = torch.ones(5, dtype=torch.bool)
    noisy, info = flame_update(updates, admitted, 0.5, torch.Generator().manual_seed(1))
    clean, _ = flame_update(updates, admitted, 0.0, torch.Generator().manual_seed(1))
    assert float((noisy - clean).std()) == pytest.approx(0.5 * info["clip_bound"], rel=0.03)


def test_cosine_distances_use_direction_only():
    d = pairwise_cosine_distances(torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))
    assert torch.allclose(d[0], torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64))


# ---- DnC --------------------------------------------------------------------------------------------
def dnc_updates(n: int = 10, d: int = 40) -> torch.Tensor:
    u = 0.1 * torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    u[-2:] += 3.0 * torch.ones(d)  # two clients far along one (dense) direction
    return u


def test_dnc_scores_and_filtering_on_hand_made_updates():
    # a rank-one centred set: scores are the squared distances to the mean
    scores = outlier_scores(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0]]))
    assert torch.allclose(scores, torch.tensor([1.0, 1.0, 1.0, 9.0], dtype=torch.float64))
    u = dnc_updates()
    good = dnc_good_mask(u, niters=5, subsample_dim=10, n_remove=2, generator=torch.Generator().manual_seed(0))
    assert good.tolist() == [True] * 8 + [False] * 2
    good3 = dnc_good_mask(u, niters=5, subsample_dim=10, n_remove=3, generator=torch.Generator().manual_seed(0))
    assert not good3[-2:].any() and int(good3.sum()) <= 7
    again = dnc_good_mask(u, niters=5, subsample_dim=10, n_remove=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(good3, again)
    assert num_removed(1.0, 3) == 3 and num_removed(1.5, 2) == 3 and num_removed(0.5, 3) == 1


def test_dnc_round_rejects_the_outliers_deterministically(flower_task_identity):
    g_state = linear_state(torch.zeros(18))
    u = dnc_updates(d=18)
    states = {200 + i: linear_state(u[i]) for i in range(10)}
    results = []
    for _ in range(2):
        strategy = DnCStrategy(num_malicious=2, subsample_dim=6, seed=7)
        results.append(run_round(strategy, g_state, states))
        assert set(strategy.last_report.rejected) == {208, 209}
    assert torch.equal(results[0]["fc.weight"], results[1]["fc.weight"])
    assert torch.allclose(vec(results[0]), u[:8].mean(0), atol=1e-6)
    strategy = DnCStrategy(seed=7)  # f = 3: the outliers go, with at least one benign client per iteration
    run_round(strategy, g_state, states)
    assert {208, 209} <= set(strategy.last_report.rejected) and len(strategy.last_report.rejected) >= 3


def test_dnc_precondition_names_the_key():
    with pytest.raises(ValueError, match="strategy.num_malicious") as info:
        DnCStrategy(num_malicious=5, filter_frac=1.0).check_preconditions(5)
    assert "\n" not in str(info.value)
    DnCStrategy(num_malicious=5).check_preconditions(6)


# ---- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls, keys", [
    ("fltrust", FLTrustStrategy, {"root_epochs": 1, "server_lr": 1.0, "root_size": None}),
    ("flame", FlameStrategy, {"noise_lambda": 0.001, "seed": 5}),
    ("dnc", DnCStrategy, {"niters": 5, "subsample_dim": 10000, "filter_frac": 1.0, "num_malicious": 3, "seed": 5}),
])
def test_configs_compose_and_build(name, cls, keys):
    strategy = build_strategy(compose_config(f"strategy={name} seed=5"))
    assert isinstance(strategy, cls)
    assert {k: getattr(strategy, k) for k in keys} == keys
    strategy.check_preconditions(10)


def test_blockwise_fltrust_and_flame_equal_their_formulas_on_the_whole_matrix(monkeypatch):
    """The column-block implementations (rows of models minus an offset) give the formulas' results."""
    import strategies.aggregation as aggregation

    monkeypatch.setattr(aggregation, "COLUMN_BLOCK", 7)  # many blocks, a ragged last one
    gen = torch.Generator().manual_seed(0)
    models, offset = torch.randn(6, 40, generator=gen), torch.randn(40, generator=gen)
    rows = torch.tensor([5, 0, 3, 2])
    updates = (models[rows] - offset).to(torch.float64)
    g0 = updates[1] + 0.1 * torch.randn(40, generator=gen, dtype=torch.float64)
    ts = dense_trust_scores(updates, g0)
    expected = (ts / ts.sum()) @ dense_normalised(updates, g0.norm())
    aggregate, blockwise_ts = fltrust_aggregate(models.to(torch.float64), g0, rows, offset)
    torch.testing.assert_close(blockwise_ts, ts)
    torch.testing.assert_close(aggregate, expected)

    admitted = torch.tensor([True, True, False, True])
    norms = updates.norm(dim=1)
    bound = torch.quantile(norms, 0.5)
    gamma = torch.clamp(bound / norms, max=1.0)
    mean = (updates[admitted] * gamma[admitted][:, None]).mean(0)
    step, info = flame_update(models, admitted, 0.0, torch.Generator().manual_seed(1), rows=rows, offset=offset)
    torch.testing.assert_close(step, mean, rtol=1e-6, atol=1e-7)
    assert info["clip_bound"] == pytest.approx(float(bound))
