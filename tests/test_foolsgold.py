"""FoolsGold: known answers for Algorithm 1, history across rounds, checkpoint round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from flower_messages import run_round

from strategies.foolsgold import FoolsGoldStrategy, foolsgold_weights


def as_state(vector: list[float]) -> dict[str, torch.Tensor]:
    """A 6-parameter model: fc.weight (2x2) then fc.bias (2), from one flat vector."""
    v = torch.tensor(vector, dtype=torch.float32)
    return {"fc.weight": v[:4].reshape(2, 2).clone(), "fc.bias": v[4:].clone()}


def zeros() -> dict[str, torch.Tensor]:
    return as_state([0.0] * 6)


# ---- the pure rule -------------------------------------------------------------------------------
def test_identical_sybils_get_zero_and_orthogonal_honest_clients_full_weight():
    histories = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 0],
                              [0, 0, 0, 1.0, 0]])
    assert foolsgold_weights(histories).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_logit_of_a_partial_similarity_by_hand():
    # cs(a, b) = 0.6, c orthogonal: v = (0.6, 0.6, 0); alpha = (0.4, 0.4, 1) -> max 1 -> c: 0.99 -> 1
    histories = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    expected = math.log(0.4 / 0.6) + 0.5
    assert foolsgold_weights(histories).tolist() == pytest.approx([expected, expected, 1.0])
    assert foolsgold_weights(histories, confidence=2.0).tolist() == pytest.approx([2 * expected, 2 * expected, 1.0])


def test_pardoning_spares_an_honest_client_that_resembles_a_sybil():
    # sybils s1 = s2 (v = 1); honest h has cs 0.6 with both (v = 0.6) -> pardoned to 0.6 * 0.6 / 1 = 0.36;
    # alpha_h = 0.64 -> logit ln(0.64 / 0.36) + 0.5 = 1.08 -> clipped to 1 (0.0945 without pardoning)
    histories = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    assert foolsgold_weights(histories).tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    histories[3] = torch.tensor([0.0, 0.6, 0.8])  # d now resembles h: cs(h, d) = 0.48
    # h: v = 0.6, pardoned cs(h, s) = 0.36, cs(h, d) = 0.48 (v_d = 0.48 < v_h) -> alpha 0.52;
    # d: v = 0.48, cs(d, h) pardoned to 0.48 * 0.48 / 0.6 = 0.384 -> alpha 0.616 (the max)
    alpha = torch.tensor([0.52, 0.616]) / 0.616
    expected = (torch.log(alpha / (1 - alpha)) + 0.5).clamp(0, 1)
    expected[1] = 1.0  # 0.99 -> ln 99 + 0.5 > 1
    out = foolsgold_weights(histories)
    assert out[:2].tolist() == [0.0, 0.0]
    assert out[2:].tolist() == pytest.approx(expected.tolist())


def test_diverse_honest_clients_keep_high_weights_and_sybils_none():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(50, generator=gen)
    honest = common + torch.randn(5, 50, generator=gen)  # related, not alike
    sybil = torch.randn(50, generator=gen)
    weights = foolsgold_weights(torch.cat([honest, sybil.expand(2, 50)]))
    assert float(weights[:5].min()) > 0.5
    assert weights[5:].tolist() == [0.0, 0.0]


def test_all_identical_histories_give_all_zero():
    assert foolsgold_weights(torch.ones(3, 4)).tolist() == [0.0, 0.0, 0.0]


# ---- the strategy --------------------------------------------------------------------------------
ROUND_1 = [(1, as_state([10, 0, 0, 0, 0, 0]), 10), (2, as_state([10, 0, 0, 0, 0, 0]), 10),
           (3, as_state([0, 0, 1, 0, 0, 0]), 50), (4, as_state([0, 0, 0, 1, 0, 0]), 5)]
# in round 2 clients 1 and 2 send opposite updates (alone: cosine -1, full weight), but their
# histories (10, 1, ...) and (10, -1, ...) still have cosine 99/101
ROUND_2 = [(1, as_state([0, 1, 0, 0, 0, 0]), 10), (2, as_state([0, -1, 0, 0, 0, 0]), 10),
           (3, as_state([0, 0, 0, 0, 1, 0]), 50), (4, as_state([0, 0, 0, 0, 0, 1]), 5)]


def test_end_to_end_sybils_are_zeroed_and_weights_ignore_example_counts(flower_task_identity):
    strategy = FoolsGoldStrategy()
    out = run_round(strategy, ROUND_1, zeros())
    assert strategy.last_report.weights == {1: 0.0, 2: 0.0, 3: 0.5, 4: 0.5}  # 50 vs 5 examples: same weight
    assert torch.allclose(out["fc.weight"], torch.tensor([[0.0, 0.0], [0.5, 0.5]]))
    info = strategy.last_report.info
    assert info["uniform_fallback"] == 0.0 and info["zero_weight"] == 2.0


def test_history_accumulates_across_rounds(flower_task_identity):
    strategy = FoolsGoldStrategy()
    run_round(strategy, ROUND_1, zeros(), server_round=1)
    run_round(strategy, ROUND_2, zeros(), server_round=2)
    assert strategy.histories[1].tolist() == [10.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert strategy.histories[4].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    # cs(1, 2) = 99/101: alpha = 2/101 -> logit far below 0 -> weight 0, although this round's
    # updates alone point in opposite directions
    assert strategy.last_report.weights[1] == 0.0 and strategy.last_report.weights[2] == 0.0
    assert strategy.last_report.weights[3] == pytest.approx(0.5)
    # a fresh strategy that sees only round 2 trusts clients 1 and 2
    fresh = FoolsGoldStrategy()
    run_round(fresh, ROUND_2, zeros(), server_round=2)
    assert fresh.last_report.weights[1] == pytest.approx(0.25)


def test_state_dict_round_trip_gives_the_same_next_round(flower_task_identity):
    strategy = FoolsGoldStrategy()
    gen = torch.Generator().manual_seed(1)
    round_1 = [(n, as_state(torch.randn(6, generator=gen).tolist()), 10) for n in (1, 2, 3, 4)]
    round_2 = [(n, as_state(torch.randn(6, generator=gen).tolist()), 10) for n in (1, 2, 3, 4)]
    run_round(strategy, round_1, zeros(), server_round=1)
    buffer = io.BytesIO()
    torch.save({"strategy_state": strategy.state_dict()}, buffer)  # as the checkpoint does
    buffer.seek(0)
    restored = FoolsGoldStrategy()
    restored.load_state_dict(torch.load(buffer, weights_only=False)["strategy_state"])
    assert set(restored.histories) == {1, 2, 3, 4}
    out_a = run_round(strategy, round_2, zeros(), server_round=2)
    out_b = run_round(restored, round_2, zeros(), server_round=2)
    assert strategy.last_report.weights == restored.last_report.weights
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    # the state dict is a copy: later rounds do not change a saved one
    saved = strategy.state_dict()
    run_round(strategy, round_2, zeros(), server_round=3)
    assert not torch.equal(saved["histories"][1], strategy.histories[1])


def test_all_zero_weights_fall_back_to_uniform_with_a_flag(flower_task_identity):
    strategy = FoolsGoldStrategy()
    same = as_state([1, 2, 3, 4, 5, 6])
    out = run_round(strategy, [(1, same, 10), (2, same, 30), (3, same, 5)], zeros())
    assert strategy.last_report.weights == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert strategy.last_report.info["uniform_fallback"] == 1.0
    assert torch.allclose(out["fc.bias"], torch.tensor([5.0, 6.0]))


def test_confidence_precondition_names_the_key():
    FoolsGoldStrategy().check_preconditions(10)
    with pytest.raises(ValueError, match="strategy.confidence"):
        FoolsGoldStrategy(confidence=0.0).check_preconditions(10)
