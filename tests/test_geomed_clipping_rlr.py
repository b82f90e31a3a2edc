"""GeoMed (RFA), norm clipping / weak DP and RLR: known answers on tiny hand-made updates."""

from __future__ import annotations

import math

import pytest
import torch
from flower_messages import run_round

from strategies.base import ReplyLimits
from strategies.geomed import GeoMedStrategy, geometric_median
from strategies.norm_clipping import (
    NormClippingStrategy,
    WeakDPStrategy,
    clip_scales,
    clipped_mean,
    gaussian_noise,
)
from strategies.rlr import RLRStrategy, rlr_step, robust_learning_rate


# ---- Flower message helpers (as in tests/test_strategies.py) ------------------------------------
def fc(weight: list[list[float]], bias: list[float], **extra) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.tensor(weight), "fc.bias": torch.tensor(bias), **extra}


def zeros() -> dict[str, torch.Tensor]:
    return fc([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])


def const(value: float) -> dict[str, torch.Tensor]:
    return fc([[value, value], [value, value]], [value, value])


# ---- GeoMed -----------------------------------------------------------------------------------
def test_geomed_collinear_points_give_the_middle_point():
    points = torch.tensor([[0.0], [0.0], [10.0]])
    median, beta, iterations = geometric_median(points, torch.ones(3), max_iter=100, nu=1e-8, tol=0.0)
    assert abs(float(median[0])) < 1e-6  # the mean is 10/3
    assert iterations < 100  # the objective stops changing once the iterate sits within nu of 0
    assert float(beta.sum()) == pytest.approx(1.0)
    assert float(beta[2]) < 1e-6  # the far point barely counts
    median, _, iterations = geometric_median(points, torch.ones(3))  # defaults: 10 iterations at most
    assert abs(float(median[0])) < 0.01 and iterations == 10


def test_geomed_square_corners_and_centre_give_the_centre_and_stop_early():
    points = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]) + 3.0
    median, beta, iterations = geometric_median(points, torch.ones(5))
    assert torch.allclose(median, torch.tensor([3.0, 3.0], dtype=torch.float64))
    assert iterations == 1  # the objective does not move from the (symmetric) start
    assert float(beta[4]) > 0.99


def test_geomed_example_weights_shift_the_median():
    # weighted 1-D median: weight 3 at 0 outweighs 1 + 1 at 10
    points = torch.tensor([[0.0], [10.0], [10.0]])
    median, _, _ = geometric_median(points, torch.tensor([3.0, 1.0, 1.0]), max_iter=200, nu=1e-9, tol=0.0)
    assert abs(float(median[0])) < 1e-6


def test_geomed_resists_one_huge_outlier(flower_task_identity):
    g = zeros()
    honest = [fc([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]), fc([[1.2, 0.1], [0.0, 0.9]], [0.4, 0.6]),
              fc([[0.9, -0.1], [0.1, 1.1]], [0.6, 0.4]), fc([[1.1, 0.0], [-0.1, 1.0]], [0.5, 0.5])]
    outlier = const(1e6)
    spec = [(10 + i, s, 10) for i, s in enumerate(honest)] + [(99, outlier, 10)]
    # defaults: the relative-objective stop (tol 1e-5 of an objective near 2.4e6) ends a few units away
    # from the cluster, where the mean sits near 2e5
    strategy = GeoMedStrategy()
    strategy.reply_limits = ReplyLimits(max_update_norm=None)  # the rule itself must resist, not the base layer
    out = run_round(strategy, spec, g)
    assert float(out["fc.weight"].abs().max()) < 5.0 and float(out["fc.bias"].abs().max()) < 5.0
    assert strategy.last_report.weights[99] < 1e-4
    assert sum(strategy.last_report.weights.values()) == pytest.approx(1.0)
    assert 1 <= strategy.last_report.info["iterations"] <= 10
    # run to convergence: inside the honest cluster
    strategy = GeoMedStrategy(max_iter=200, tol=0.0)
    out = run_round(strategy, spec, g)
    assert 0.85 < float(out["fc.weight"][0, 0]) < 1.25 and float(out["fc.weight"][0, 1].abs()) < 0.2
    assert 0.35 < float(out["fc.bias"][0]) < 0.65


def test_geomed_batchnorm_buffers_come_from_fedavg_not_the_median(flower_task_identity):
    g = {**zeros(), "bn.running_mean": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}
    def client(mean: float, steps: int) -> dict[str, torch.Tensor]:
        return {**const(1.0), "bn.running_mean": torch.full((2,), mean), "bn.num_batches_tracked": torch.tensor(steps)}

    spec = [(1, client(100.0, 3), 30), (2, client(0.0, 5), 10), (3, client(0.0, 1), 10)]
    strategy = GeoMedStrategy()
    strategy.trainable_keys = ["fc.weight", "fc.bias"]
    out = run_round(strategy, spec, g)
    assert torch.allclose(out["fc.weight"], torch.ones(2, 2))
    assert torch.allclose(out["bn.running_mean"], torch.full((2,), 60.0))  # 100 * 30/50
    assert out["bn.num_batches_tracked"].item() == 5


def test_geomed_preconditions_name_the_key():
    for kwargs, key in (({"max_iter": 0}, "strategy.max_iter"), ({"nu": 0.0}, "strategy.nu"),
                        ({"tol": -1.0}, "strategy.tol")):
        with pytest.raises(ValueError, match=key):
            GeoMedStrategy(**kwargs).check_preconditions(10)


# ---- norm clipping / weak DP ---------------------------------------------------------------------
def test_clip_scales_large_updates_to_the_bound_and_leaves_small_ones():
    updates = torch.tensor([[6.0, 8.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 0.0]])
    assert clip_scales(torch.tensor([10.0, 0.5, 0.0], dtype=torch.float64), 2.0).tolist() == pytest.approx([0.2, 1, 1])
    for weights, expected in (([1.0, 0.0, 0.0], [1.2, 1.6, 0.0]),     # clipped to norm 2
                              ([0.0, 1.0, 0.0], [0.3, 0.4, 0.0]),     # left as it is
                              ([1.0, 3.0, 0.0], [0.525, 0.7, 0.0])):  # (1.2 + 0.9)/4, (1.6 + 1.2)/4
        mean, norms = clipped_mean(updates, torch.tensor(weights), 2.0)
        assert norms.tolist() == pytest.approx([10.0, 0.5, 0.0])
        assert torch.allclose(mean, torch.tensor(expected, dtype=torch.float64))
    # the same on models and the global model they came from (the round's matrix), rows picked
    offset = torch.tensor([1.0, -2.0, 0.5])
    mean, norms = clipped_mean(updates + offset, torch.tensor([3.0, 1.0]), 2.0, rows=torch.tensor([1, 0]),
                               offset=offset)
    assert norms.tolist() == pytest.approx([0.5, 10.0]) and torch.allclose(mean, torch.tensor(
        [0.525, 0.7, 0.0], dtype=torch.float64))


def test_norm_clipping_end_to_end_ignores_batchnorm_buffers(flower_task_identity):
    g = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2), "bn.running_mean": torch.zeros(3)}
    # client 1: update of norm 10 on the trainable keys (6, 8 in the weight), huge BatchNorm statistics;
    # client 2: update of norm 1, its BatchNorm statistics would push it over the bound if counted
    big = {"fc.weight": torch.tensor([[6.0, 8.0], [0.0, 0.0]]), "fc.bias": torch.zeros(2),
           "bn.running_mean": torch.full((3,), 1000.0)}
    small = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.tensor([0.6, 0.8]),
             "bn.running_mean": torch.full((3,), 50.0)}
    strategy = NormClippingStrategy(norm_bound=2.0)  # trainable_keys unset: BatchNorm statistics excluded by name
    out = run_round(strategy, [(1, big, 10), (2, small, 10)], g)
    assert torch.allclose(out["fc.weight"], torch.tensor([[0.6, 0.8], [0.0, 0.0]]))  # (1.2, 1.6) / 2
    assert torch.allclose(out["fc.bias"], torch.tensor([0.3, 0.4]))                  # untouched (0.6, 0.8) / 2
    assert torch.allclose(out["bn.running_mean"], torch.full((3,), 525.0))           # FedAvg of the buffers
    info = strategy.last_report.info
    assert info["clipped"] == 1.0 and info["mean_norm"] == pytest.approx(5.5) and info["norm_bound"] == 2.0


def test_weak_dp_noise_has_the_configured_std_and_is_reproducible():
    noise = gaussian_noise(200_000, 0.025, seed=7, server_round=3)
    assert abs(float(noise.std()) / 0.025 - 1.0) < 0.05
    assert abs(float(noise.mean())) < 0.025 * 0.05
    assert torch.equal(noise, gaussian_noise(200_000, 0.025, seed=7, server_round=3))
    assert not torch.equal(noise[:100], gaussian_noise(100, 0.025, seed=7, server_round=4))
    assert not torch.equal(noise[:100], gaussian_noise(100, 0.025, seed=8, server_round=3))


def test_weak_dp_end_to_end_adds_seeded_noise_to_the_clipped_mean(flower_task_identity):
    g = {"fc.weight": torch.zeros(100, 200), "fc.bias": torch.zeros(200)}
    spec = [(1, {"fc.weight": torch.full((100, 200), 1.0), "fc.bias": torch.zeros(200)}, 10),
            (2, {"fc.weight": torch.zeros(100, 200), "fc.bias": torch.zeros(200)}, 10)]

    def aggregate(seed: int) -> dict:
        return run_round(WeakDPStrategy(norm_bound=2.0, noise_std=0.025, seed=seed), spec, g, server_round=5)

    first, again, other = aggregate(3), aggregate(3), aggregate(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    clipped_value = 0.5 * 2.0 / math.sqrt(100 * 200)  # client 1's update (norm 141) clipped to 2, averaged with 0
    residual = torch.cat([first["fc.weight"].reshape(-1) - clipped_value, first["fc.bias"]])
    assert abs(float(residual.std()) / 0.025 - 1.0) < 0.05
    assert abs(float(residual.mean())) < 0.025 * 0.05


def test_norm_clipping_preconditions_name_the_key():
    with pytest.raises(ValueError, match="strategy.norm_bound"):
        NormClippingStrategy(norm_bound=0.0).check_preconditions(10)
    with pytest.raises(ValueError, match="strategy.noise_std"):
        WeakDPStrategy(noise_std=-0.1).check_preconditions(10)


# ---- RLR ---------------------------------------------------------------------------------------
def test_rlr_three_of_four_agree_keeps_eta_and_a_split_flips_it():
    # column 0: 3 of 4 positive, one negative (|sum sign| = 2); column 1: 4 of 4 (4);
    # column 2: 2-2 split (0); column 3: 3 positive, one zero (3)
    updates = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 2.0], [1.0, 3.0, -1.0, 3.0],
                            [-1.0, 4.0, -1.0, 0.0]])
    assert robust_learning_rate(updates, threshold=2, server_lr=0.5).tolist() == [0.5, 0.5, -0.5, 0.5]
    assert robust_learning_rate(updates, threshold=3, server_lr=1.0).tolist() == [-1.0, 1.0, -1.0, 1.0]
    step, lr = rlr_step(updates, torch.tensor([1.0, 1.0, 1.0, 1.0]), threshold=3, server_lr=1.0)
    assert step.tolist() == pytest.approx([-0.5, 2.5, 0.0, 1.5])
    # example weights scale the mean, not the vote
    step, _ = rlr_step(updates, torch.tensor([3.0, 1.0, 0.0, 0.0]), threshold=3, server_lr=1.0)
    assert step.tolist() == pytest.approx([-1.0, 1.25, -1.0, 1.25])


def test_rlr_end_to_end_flips_the_split_coordinate_and_counts_it(flower_task_identity):
    g = zeros()

    def client(w00: float, b0: float) -> dict[str, torch.Tensor]:
        s = const(0.1)  # every other coordinate: all four clients agree (+eta)
        s["fc.weight"][0, 0], s["fc.bias"][0] = w00, b0
        return s

    # fc.weight[0, 0]: all four push up; fc.bias[0]: a 2-2 split -> -eta with theta = 3
    ups = [client(1.0, 1.0), client(1.0, 1.0), client(2.0, -3.0), client(4.0, -3.0)]
    strategy = RLRStrategy(threshold=3, server_lr=1.0, min_train_nodes=2)
    out = run_round(strategy, [(20 + i, s, 10) for i, s in enumerate(ups)], g)
    assert out["fc.weight"][0, 0].item() == pytest.approx(2.0)   # +1 * mean(1, 1, 2, 4)
    assert out["fc.bias"][0].item() == pytest.approx(1.0)        # -1 * mean(1, 1, -3, -3)
    assert out["fc.weight"][1, 1].item() == pytest.approx(0.1)
    info = strategy.last_report.info
    assert info["flipped"] == 1.0 and info["flipped_fraction"] == pytest.approx(1 / 6)
    assert strategy.last_report.weights == {20: 0.25, 21: 0.25, 22: 0.25, 23: 0.25}


def test_rlr_threshold_precondition_names_the_key():
    RLRStrategy(threshold=4).check_preconditions(4)
    with pytest.raises(ValueError, match=r"strategy\.threshold=5 .*<= 4"):
        RLRStrategy(threshold=5).check_preconditions(4)
    with pytest.raises(ValueError, match="strategy.server_lr"):
        RLRStrategy(server_lr=0.0).check_preconditions(4)


def test_geometric_median_on_rows_minus_an_offset_equals_it_on_the_difference(monkeypatch):
    """The block-wise form (models[rows] - global, as the strategy calls it) is the median of the updates."""
    import strategies.aggregation as aggregation
    from strategies.geomed import geometric_median

    monkeypatch.setattr(aggregation, "COLUMN_BLOCK", 5)  # several blocks and a ragged last one
    gen = torch.Generator().manual_seed(2)
    models, offset = torch.randn(7, 23, generator=gen), torch.randn(23, generator=gen)
    rows = torch.tensor([6, 1, 4, 0, 2])
    alphas = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0])
    blockwise, beta, _ = geometric_median(models, alphas, rows=rows, offset=offset)
    direct, direct_beta, _ = geometric_median((models[rows] - offset).to(torch.float64), alphas)
    torch.testing.assert_close(blockwise, direct)
    torch.testing.assert_close(beta, direct_beta)
    torch.testing.assert_close(blockwise, beta @ (models[rows] - offset).to(torch.float64))
