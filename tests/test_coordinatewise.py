"""Coordinate-wise median and trimmed mean: known answers, preconditions, BatchNorm handling, and
equivalence with Flower 1.41's `FedMedian` and `FedTrimmedAvg` on the same random replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_messages import assert_same, replies_for, run_thorn
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from strategies.aggregation import lane_closest_to_median_mean
from strategies.median import MedianStrategy, coordinate_median
from strategies.trimmed_mean import TrimmedMeanStrategy, trimmed_count, trimmed_mean


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---- median: known answers -----------------------------------------------------------------------
def test_median_odd_count():
    v = t64([[1, 5, -2], [3, -1, -2], [2, 0, 7]])
    torch.testing.assert_close(coordinate_median(v), t64([2, 0, -2]))


def test_median_even_count_is_the_mean_of_the_two_middle_values():
    v = t64([[1, 0], [2, -8], [10, 5], [4, 6]])
    # column 0: 1 2 4 10 -> (2 + 4) / 2 = 3 (torch.median would say 2); column 1: -8 0 5 6 -> 2.5
    torch.testing.assert_close(coordinate_median(v), t64([3, 2.5]))


def test_median_strategy_parameters_buffers_and_weights(flower_task_identity):
    g = {"fc.weight": torch.zeros(2, 2), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(0)}
    states = [{"fc.weight": torch.full((2, 2), w), "bn.running_var": torch.full((2,), v),
               "bn.num_batches_tracked": torch.tensor(steps)}
              for w, v, steps in ((1.0, 1.0, 3), (2.0, 3.0, 4), (100.0, 9.0, 5))]
    strategy = MedianStrategy()
    out = run_thorn(strategy, states, [10, 10, 20], g)
    torch.testing.assert_close(out["fc.weight"], torch.full((2, 2), 2.0))
    # BatchNorm statistics: example-weighted FedAvg (10 * 1 + 10 * 3 + 20 * 9) / 40, counters by max
    torch.testing.assert_close(out["bn.running_var"], torch.full((2,), 5.5))
    assert out["bn.num_batches_tracked"].item() == 5 and out["bn.num_batches_tracked"].dtype == torch.int64
    assert strategy.last_report.weights == pytest.approx({100: 1 / 3, 101: 1 / 3, 102: 1 / 3})
    assert strategy.last_report.rejected == {}


# ---- trimmed mean: known answers -----------------------------------------------------------------
# ten values: sorted -100 -50 1 2 3 4 5 50 60 100
TEN = [100, -100, 1, 2, 3, 4, 5, 60, 50, -50]


@pytest.mark.parametrize(("beta", "expected"), [
    (0.0, 75 / 10),          # nothing trimmed: the mean
    (0.1, 75 / 8),           # 1 each end: -50 .. 60
    (0.2, 65 / 6),           # 2 each end: 1 .. 50
    (0.25, 65 / 6),          # floor(2.5) = 2
    (0.3, 14 / 4),           # 3 each end: 2 .. 5
    (0.49, 7 / 2),           # floor(4.9) = 4: 3, 4
])
def test_trimmed_mean_removes_floor_beta_n_at_each_end(beta, expected):
    v = t64([[x, -x] for x in TEN])  # the second coordinate is trimmed independently (mirrored)
    torch.testing.assert_close(trimmed_mean(v, beta), t64([expected, -expected]))


def test_trimmed_count_is_an_exact_floor():
    assert trimmed_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert trimmed_count(11, 0.2) == 2 and trimmed_count(4, 0.2) == 0 and trimmed_count(10, 0.3) == 3


def test_trimmed_mean_strategy(flower_task_identity):
    g = {"fc.weight": torch.zeros(1), "bn.running_mean": torch.zeros(1)}
    states = [{"fc.weight": torch.tensor([float(x)]), "bn.running_mean": torch.tensor([float(i)])}
              for i, x in enumerate(TEN)]
    strategy = TrimmedMeanStrategy(beta=0.3)
    out = run_thorn(strategy, states, [1] * 9 + [11], g)
    torch.testing.assert_close(out["fc.weight"], torch.tensor([3.5]))
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([(36 + 99) / 20]))
    assert strategy.last_report.weights[105] == pytest.approx(0.1)
    assert strategy.last_report.info == {"num_trimmed_each_end": 3.0}


@pytest.mark.parametrize("beta", [0.5, -0.1, 0.7])
def test_trimmed_mean_precondition_names_the_key(beta):
    with pytest.raises(ValueError, match=r"strategy\.beta") as exc:
        TrimmedMeanStrategy(beta=beta).check_preconditions(10)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"strategy\.beta"):
        trimmed_mean(torch.zeros(10, 3), beta)


def test_trimmed_mean_precondition_that_holds():
    TrimmedMeanStrategy(beta=0.0).check_preconditions(10)
    TrimmedMeanStrategy(beta=0.2).check_preconditions(3)  # trims nothing: a warning, not an error


# ---- equivalence with Flower 1.41 ----------------------------------------------------------------
def random_round(n: int, seed: int):
    """n float-only client models (2,128 parameters) with heavy-tailed noise, random num-examples."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (4, 3, 3, 3), "fc.weight": (20, 100), "fc.bias": (20,)}
    g = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    states = []
    for i in range(n):
        scale = 5.0 if i % 4 == 3 else 0.1
        states.append({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in g.items()})
    examples = torch.randint(10, 500, (n,), generator=gen).tolist()
    return g, states, examples


@pytest.mark.parametrize("n", [11, 10])
def test_median_matches_flower(flower_task_identity, n):
    g, states, examples = random_round(n, seed=n)
    ours = run_thorn(MedianStrategy(), states, examples, g)
    theirs, _ = FedMedian().aggregate_train(1, replies_for(states, examples, g))
    assert_same(ours, theirs)


@pytest.mark.parametrize(("n", "beta"), [(11, 0.2), (10, 0.2), (11, 0.0), (12, 0.45)])
def test_trimmed_mean_matches_flower(flower_task_identity, n, beta):
    g, states, examples = random_round(n, seed=n)
    ours = run_thorn(TrimmedMeanStrategy(beta=beta), states, examples, g)
    theirs, _ = FedTrimmedAvg(beta=beta).aggregate_train(1, replies_for(states, examples, g))
    assert_same(ours, theirs)


def test_pure_functions_match_flower_math_on_a_larger_matrix():
    import numpy as np
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    x = torch.randn(11, 20_000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(coordinate_median(x), torch.from_numpy(np.median(x.numpy(), axis=0)))
    torch.testing.assert_close(trimmed_mean(x, 0.2), torch.from_numpy(trim_mean(x.numpy(), 0.2)),
                               rtol=1e-5, atol=1e-6)


def test_integer_only_buffers_take_the_max(flower_task_identity):
    g = {"fc.weight": torch.zeros(3), "steps": torch.tensor(0)}
    states = [{"fc.weight": torch.tensor([1.0, 2.0, 3.0]) * i, "steps": torch.tensor(i)} for i in range(5)]
    for strategy in (MedianStrategy(), TrimmedMeanStrategy()):
        out = run_thorn(strategy, states, [10] * 5, g)
        torch.testing.assert_close(out["fc.weight"], torch.tensor([2.0, 4.0, 6.0]))
        assert out["steps"].item() == 4


@pytest.mark.parametrize("theta", [3, 4, 7, 10, 11, 25])
def test_closest_to_median_mean_by_selections_equals_the_definition(theta):
    """aggregation.lane_closest_to_median_mean against the definition (sort each lane by distance to its
    median, average the beta nearest), for every beta, odd and even lanes, and lanes with repeated values."""
    rng = np.random.default_rng(theta)
    values = rng.standard_normal((200, theta)).astype(np.float32)
    values[:50] = np.round(values[:50])  # ties in value
    compared = 0
    for beta in range(1, theta):
        median = np.median(values.astype(np.float64), axis=1)
        order = np.argsort(np.abs(values - median[:, None]), axis=1, kind="stable")[:, :beta]
        expected = np.take_along_axis(values.astype(np.float64), order, axis=1).mean(axis=1)
        got = lane_closest_to_median_mean(values, beta)
        # a tie in distance at the beta-th place (m - d and m + d) makes either choice right: compare the rest
        distances = np.sort(np.abs(values - median[:, None]), axis=1)
        tied = distances[:, beta - 1] == distances[:, beta]
        compared += int((~tied).sum())
        np.testing.assert_allclose(got[~tied], expected[~tied], rtol=1e-5, atol=1e-6, err_msg=f"beta={beta}")
    assert compared > 100 * (theta - 2)  # (for even lanes, beta = 1 is always a tie: the two middle values)
