"""Krum, Multi-Krum and Bulyan: known answers on hand-made updates, preconditions, and equivalence with
Flower 1.41's built-in Message-API strategies on the same random replies."""

from __future__ import annotations

import gc

import pytest
import torch
from flower_messages import assert_same, replies_for, run_thorn
from flwr.serverapp.strategy import Bulyan, Krum, MultiKrum

from strategies.aggregation import flatten_states
from strategies.bulyan import BulyanStrategy, bulyan, closest_to_median_mean, iterative_krum_select
from strategies.krum import (
    KrumStrategy,
    MultiKrumStrategy,
    krum_scores,
    krum_select,
    multikrum_select,
    pairwise_sq_distances,
)


def col(values) -> torch.Tensor:
    """1-D positions as an (n, 1) float64 matrix: squared distances are exact integers."""
    return torch.tensor(values, dtype=torch.float64)[:, None]


def state(w: float, b: float, **extra) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((2, 2), float(w)), "fc.bias": torch.full((2,), float(b)), **extra}


# ---- Krum: known answers -------------------------------------------------------------------------
# Positions 0, 1, -1, 3, -4 (honest) and 50, 51 (attackers); n = 7, f = 2 -> n - f - 2 = 3 neighbours.
# Squared distances to the 3 nearest others:
#   0: 1 + 1 + 9 = 11     1: 1 + 4 + 4 = 9     -1: 1 + 4 + 9 = 14     3: 4 + 9 + 16 = 29
#  -4: 9 + 16 + 25 = 50   50: 1 + 2209 + 2401  51: 1 + 2304 + 2500
# Krum picks position 1 (index 1). With 4 neighbours (n - f - 1) position 0 wins (27 < 30 < 34), and
# with 2 (n - f - 3, or "n - f - 2 counting itself") too (2 < 5): the neighbour count matters.
POSITIONS = [0, 1, -1, 3, -4, 50, 51]


def test_krum_scores_and_pick_by_hand():
    scores = krum_scores(col(POSITIONS), num_malicious=2)
    expected = [11, 9, 14, 29, 50, 1 + 47**2 + 49**2, 1 + 48**2 + 50**2]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    assert krum_select(col(POSITIONS), num_malicious=2) == 1


def test_krum_neighbour_count_changes_the_answer():
    assert krum_select(col(POSITIONS), num_malicious=1) == 0  # 4 neighbours: 0 scores 27, 1 scores 34
    assert krum_select(col(POSITIONS), num_malicious=3) == 0  # 2 neighbours: 0 scores 2, 1 scores 5


def test_multikrum_selection_order():
    assert multikrum_select(col(POSITIONS), 2, 5).tolist() == [1, 0, 2, 3, 4]
    assert multikrum_select(col(POSITIONS), 2, 3).tolist() == [1, 0, 2]


def test_pairwise_distances_exact_symmetric_and_far_from_origin():
    x = torch.randn(6, 50, dtype=torch.float64)
    d2 = pairwise_sq_distances(x)
    expected = torch.cdist(x, x).square()
    torch.testing.assert_close(d2, expected)
    assert torch.equal(d2, d2.T) and torch.all(d2.diagonal() == 0)
    # models far from the origin and close to each other: centring avoids cancellation (float32)
    y = (1000.0 + 1e-3 * torch.randn(6, 50)).double()  # exactly the float32 values
    torch.testing.assert_close(pairwise_sq_distances(y.float()), torch.cdist(y, y).square(), rtol=1e-3, atol=1e-9)


def test_krum_strategy_keeps_one_model_and_reports_rejections(flower_task_identity):
    g = state(0, 0)
    states = [state(p, p) for p in POSITIONS]
    strategy = KrumStrategy(num_malicious=2)
    out = run_thorn(strategy, states, [10, 20, 30, 40, 50, 60, 70], g)
    assert torch.equal(out["fc.weight"], torch.full((2, 2), 1.0))  # position 1, node 101
    report = strategy.last_report
    assert report.weights[101] == 1.0 and sum(report.weights.values()) == 1.0
    assert set(report.rejected) == {100, 102, 103, 104, 105, 106}
    assert report.rejected[100] == "krum score rank 2/7 (1 kept)"
    assert report.rejected[106] == "krum score rank 7/7 (1 kept)"


def test_multikrum_strategy_weighted_and_plain_average(flower_task_identity):
    g = state(0, 0)
    states = [state(p, p) for p in POSITIONS]
    examples = [10, 20, 10, 20, 40, 100, 100]
    # m = n - f = 5 by default: positions 0, 1, -1, 3, -4 weighted 10, 20, 10, 20, 40 -> -90 / 100
    strategy = MultiKrumStrategy(num_malicious=2)
    out = run_thorn(strategy, states, examples, g)
    torch.testing.assert_close(out["fc.bias"], torch.full((2,), -0.9))
    assert set(strategy.last_report.rejected) == {105, 106}
    assert strategy.last_report.weights[104] == pytest.approx(0.4)
    # m = 3: positions 1, 0, -1 weighted 20, 10, 10 -> 10 / 40; unweighted (the paper) -> 0
    out = run_thorn(MultiKrumStrategy(num_malicious=2, num_selected=3), states, examples, g)
    torch.testing.assert_close(out["fc.bias"], torch.full((2,), 0.25))
    out = run_thorn(MultiKrumStrategy(num_malicious=2, num_selected=3, weighted=False), states, examples, g)
    torch.testing.assert_close(out["fc.bias"], torch.full((2,), 0.0))


def test_krum_distances_ignore_batchnorm_statistics(flower_task_identity):
    # node 101 (position 1) wins on parameters; a huge running_mean must not change that
    g = state(0, 0, **{"bn.running_mean": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)})
    states = [state(p, p, **{"bn.running_mean": torch.full((3,), 1e6 if p == 1 else 0.0),
                             "bn.num_batches_tracked": torch.tensor(5)}) for p in POSITIONS]
    strategy = KrumStrategy(num_malicious=2)
    out = run_thorn(strategy, states, [10] * 7, g)
    assert set(strategy.last_report.weights) == set(range(100, 107)) and strategy.last_report.weights[101] == 1.0
    assert out["bn.running_mean"][0] == 1e6 and out["bn.num_batches_tracked"] == 5


# ---- Bulyan: known answers -----------------------------------------------------------------------
# Positions 0, 1, 3, 4, 10, 30, 31 (indices 0..6); n = 7, f = 1: θ = 5, β = 3.
# Recursive Krum (neighbours = |remaining| - 3, at least 1):
#   7 left, 4 neighbours: 0:126  1:95  3:63  4:62  10:266  30:1806  31:1955      -> picks 4 (index 3)
#   6 left, 3 neighbours: 0:110  1:86  3:62  10:230  30:1130  31:1226            -> picks 3 (index 2)
#   5 left, 2 neighbours: 0:101  1:82  10:181  30:401  31:442                    -> picks 1 (index 1)
#   4 left, 1 neighbour:  0:100  10:100  30:1  31:1  (tie -> first)              -> picks 30 (index 5)
#   3 left, 1 neighbour:  0:100  10:100  31:441      (tie -> first)              -> picks 0 (index 0)
# One-shot Multi-Krum (Flower) keeps the 5 lowest first-round scores: 4, 3, 1, 0, 10.
# Either way the values closest to the median (3) are 3, 4, 1 -> 8/3.
BULYAN_POSITIONS = [0, 1, 3, 4, 10, 30, 31]


def test_bulyan_recursive_krum_selection_by_hand():
    x = col(BULYAN_POSITIONS)
    assert iterative_krum_select(x, 1, 5).tolist() == [3, 2, 1, 5, 0]
    assert multikrum_select(x, 1, 5).tolist() == [3, 2, 1, 0, 4]
    for selection, chosen in (("krum", [3, 2, 1, 5, 0]), ("multikrum", [3, 2, 1, 0, 4])):
        value, selected = bulyan(x, 1, selection)
        assert selected.tolist() == chosen
        torch.testing.assert_close(value, torch.tensor([8 / 3], dtype=torch.float64))


def test_closest_to_median_mean_by_hand():
    # coordinate 0: median 0.2, 3 closest 0.2, 0.1, 0.3 -> 0.2
    # coordinate 1: median 0.5, 3 closest 0.5, 0.6, 0.65 -> 0.58333
    # coordinate 2: median 0 of (-9, -1, 0, 2, 7); closest 0, -1, 2 -> 1/3
    v = torch.tensor([[0.0, 0.0, -9.0], [0.1, 0.1, -1.0], [0.2, 0.5, 0.0], [0.3, 0.6, 2.0], [1.0, 0.65, 7.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(closest_to_median_mean(v, 3),
                               torch.tensor([0.2, 1.75 / 3, 1 / 3], dtype=torch.float64))


def test_bulyan_strategy_state_weights_and_buffers(flower_task_identity):
    g = state(0, 0, **{"bn.running_mean": torch.zeros(2)})
    states = [state(p, -p, **{"bn.running_mean": torch.full((2,), float(p))}) for p in BULYAN_POSITIONS]
    # the strategy orders updates by (num-examples, CRC): increasing counts keep the index order, so
    # the ties of recursive Krum are broken as in the hand computation above
    examples = [10, 11, 12, 13, 14, 15, 16]
    strategy = BulyanStrategy(num_malicious=1)
    out = run_thorn(strategy, states, examples, g)
    torch.testing.assert_close(out["fc.weight"], torch.full((2, 2), 8 / 3))
    torch.testing.assert_close(out["fc.bias"], torch.full((2,), -8 / 3))
    # BatchNorm statistics: FedAvg of the selected 0, 1, 3, 4, 30 weighted 10, 11, 12, 13, 15 -> 549 / 61
    torch.testing.assert_close(out["bn.running_mean"], torch.full((2,), 9.0))
    report = strategy.last_report
    assert set(report.rejected) == {104, 106}
    assert report.weights[105] == pytest.approx(0.2) and report.weights[104] == 0.0
    assert report.info == {"theta": 5.0, "beta": 3.0}


def test_bulyan_skips_a_round_with_too_few_replies(flower_task_identity):
    strategy = BulyanStrategy(num_malicious=1)
    strategy.global_state = state(0, 0)
    arrays, _ = strategy.aggregate_train(1, replies_for([state(p, p) for p in range(6)], [10] * 6, state(0, 0)))
    assert arrays is None and strategy.last_report.skipped


# ---- preconditions -------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "n", "key"), [
    (lambda: KrumStrategy(num_malicious=3), 8, "strategy.num_malicious"),
    (lambda: MultiKrumStrategy(num_malicious=3), 8, "strategy.num_malicious"),
    (lambda: KrumStrategy(num_malicious=-1), 10, "strategy.num_malicious"),
    (lambda: MultiKrumStrategy(num_malicious=3, num_selected=8), 10, "strategy.num_selected"),
    (lambda: MultiKrumStrategy(num_malicious=3, num_selected=0), 10, "strategy.num_selected"),
    (lambda: BulyanStrategy(num_malicious=3), 14, "strategy.num_malicious"),
    (lambda: BulyanStrategy(num_malicious=1, selection="median"), 7, "strategy.selection"),
])
def test_preconditions_name_the_key(make, n, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as exc:
        make().check_preconditions(n)
    assert "\n" not in str(exc.value)


def test_preconditions_that_hold():
    KrumStrategy(num_malicious=3).check_preconditions(9)
    MultiKrumStrategy(num_malicious=3, num_selected=7).check_preconditions(10)
    BulyanStrategy(num_malicious=3).check_preconditions(15)


# ---- equivalence with Flower 1.41 ----------------------------------------------------------------
N_CLIENTS, F = 11, 2


def random_round(seed: int = 0):
    """11 float-only client models (2,128 parameters), random num-examples: two honest groups with
    different spreads and a tight colluding trio. On these, Krum's pick changes when the neighbour
    count is off by one (checked below), so the comparison with Flower tests the count too."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (4, 3, 3, 3), "fc.weight": (20, 100), "fc.bias": (20,)}
    g = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    states = []
    for size, shift, spread in ((4, 0.0, 0.1), (4, 0.1, 0.05), (3, 0.15, 0.02)):
        for _ in range(size):
            scale = spread * (1 + 0.5 * torch.rand(1, generator=gen).item())
            states.append({k: v + shift + scale * torch.randn(v.shape, generator=gen) for k, v in g.items()})
    examples = torch.randint(10, 500, (N_CLIENTS,), generator=gen).tolist()
    return g, states, examples


@pytest.mark.parametrize("seed", [0, 1])
def test_krum_matches_flower(flower_task_identity, seed):
    g, states, examples = random_round(seed)
    ours = run_thorn(KrumStrategy(num_malicious=F), states, examples, g)
    theirs, _ = Krum(num_malicious_nodes=F).aggregate_train(1, replies_for(states, examples, g))
    assert_same(ours, theirs)
    x = flatten_states(states, list(g))
    assert krum_select(x, F - 1) != krum_select(x, F) or krum_select(x, F + 1) != krum_select(x, F)


@pytest.mark.parametrize(("seed", "m"), [(0, None), (1, None), (0, 4)])
def test_multikrum_matches_flower(flower_task_identity, seed, m):
    g, states, examples = random_round(seed)
    ours = run_thorn(MultiKrumStrategy(num_malicious=F, num_selected=m), states, examples, g)
    flower = MultiKrum(num_malicious_nodes=F, num_nodes_to_select=m or N_CLIENTS - F)
    theirs, _ = flower.aggregate_train(1, replies_for(states, examples, g))
    assert_same(ours, theirs)


@pytest.fixture
def frozen_gc():
    """Flower's Bulyan calls gc.collect() once per reply (`to_numpy_ndarrays(keep_input=False)`), which
    costs ~0.15 s each under pytest's heap; freezing the existing objects makes those collections cheap."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.parametrize("seed", [0, 1])
def test_bulyan_multikrum_selection_matches_flower(flower_task_identity, frozen_gc, seed):
    g, states, examples = random_round(seed)
    ours = run_thorn(BulyanStrategy(num_malicious=F, selection="multikrum"), states, examples, g)
    theirs, _ = Bulyan(num_malicious_nodes=F).aggregate_train(1, replies_for(states, examples, g))
    assert_same(ours, theirs)


def test_recursive_krum_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 40, generator=gen, dtype=torch.float64)
    x[8:] += 0.5
    remaining, expected = list(range(11)), []
    for _ in range(11 - 2 * F):
        def score(i, rest):
            d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in rest if j != i)
            return sum(d[:max(len(rest) - F - 2, 1)])
        best = min(remaining, key=lambda i, rest=tuple(remaining): score(i, rest))
        expected.append(best)
        remaining.remove(best)
    assert iterative_krum_select(x, F, 11 - 2 * F).tolist() == expected
