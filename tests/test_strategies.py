"""The strategy base layer: aggregation math, reply handling, defense categories, truth stripping."""

from __future__ import annotations

import pytest
import torch
from flower_messages import reply_to as make_reply
from flower_messages import train_message
from flwr.app import ArrayRecord, ConfigRecord

from server.truth import TruthStrippingGrid
from strategies.aggregation import flatten_states, unflatten_vector, weighted_average_states
from strategies.base import AnomalyDetection, Reweighting
from strategies.fedavg import FedAvgStrategy


def state(w: float, b: float, steps: int) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((2, 2), float(w)), "fc.bias": torch.full((2,), float(b)),
            "bn.num_batches_tracked": torch.tensor(steps)}


def test_weighted_average_of_state_dicts_and_integer_buffers():
    out = weighted_average_states([state(1.0, 0.0, 5), state(4.0, 3.0, 9)], [2.0, 1.0])
    assert torch.allclose(out["fc.weight"], torch.full((2, 2), 2.0))
    assert torch.allclose(out["fc.bias"], torch.full((2,), 1.0))
    assert out["bn.num_batches_tracked"].item() == 9 and out["bn.num_batches_tracked"].dtype == torch.int64
    assert list(out) == ["fc.weight", "fc.bias", "bn.num_batches_tracked"]


def test_flatten_unflatten_roundtrip():
    s = state(1.5, -2.0, 1)
    keys = ["fc.weight", "fc.bias"]
    matrix = flatten_states([s, s], keys)
    assert matrix.shape == (2, 6)
    back = unflatten_vector(matrix[0], s, keys)
    assert all(torch.equal(back[k], s[k]) for k in keys)


@pytest.mark.parametrize("weights", [[], [-1.0, 2.0], [0.0, 0.0]])
def test_invalid_weights_are_rejected(weights):
    with pytest.raises(ValueError):
        weighted_average_states([state(1, 1, 1), state(2, 2, 2)][: max(len(weights), 1)], weights)


class DropNode(AnomalyDetection):
    def __init__(self, node, **kw):
        super().__init__(**kw)
        self.node = node

    def detect(self, server_round, global_state, updates):
        return {self.node: "test says so"}


class FixedWeights(Reweighting):
    def client_weights(self, server_round, global_state, updates):
        return torch.tensor([3.0 if u.node_id == 11 else 1.0 for u in updates])


def run_round(strategy, replies_spec, global_state):
    strategy.global_state = global_state
    msgs = [train_message(node, global_state) for node, *_ in replies_spec]
    replies = [make_reply(m, s, n) for m, (_, s, n) in zip(msgs, replies_spec, strict=True)]
    return strategy.aggregate_train(1, replies)


def test_fedavg_weights_by_example_count_and_reports(flower_task_identity):
    g = state(0, 0, 0)
    strategy = FedAvgStrategy()
    arrays, metrics = run_round(strategy, [(11, state(1, 1, 1), 30), (12, state(4, 4, 1), 10)], g)
    out = arrays.to_torch_state_dict()
    assert torch.allclose(out["fc.weight"], torch.full((2, 2), 1.75))
    assert strategy.last_report.weights == {11: 0.75, 12: 0.25}
    assert strategy.last_report.train_loss == pytest.approx(0.5)
    assert metrics["num-clients"] == 2


def test_anomaly_detection_drops_rejected_and_reports_them(flower_task_identity):
    strategy = DropNode(12)
    arrays, _ = run_round(strategy, [(11, state(1, 1, 1), 10), (12, state(9, 9, 1), 10)], state(0, 0, 0))
    assert torch.allclose(arrays.to_torch_state_dict()["fc.weight"], torch.full((2, 2), 1.0))
    assert strategy.last_report.rejected == {12: "test says so"}
    assert strategy.last_report.weights == {11: 1.0, 12: 0.0}


def test_reweighting_uses_defense_weights_not_example_counts(flower_task_identity):
    strategy = FixedWeights()
    arrays, _ = run_round(strategy, [(11, state(1, 1, 1), 1), (12, state(5, 5, 1), 1000)], state(0, 0, 0))
    assert torch.allclose(arrays.to_torch_state_dict()["fc.weight"], torch.full((2, 2), 2.0))
    assert strategy.last_report.weights[11] == pytest.approx(0.75)


def test_invalid_replies_are_rejected_with_a_reason_and_the_round_goes_on(flower_task_identity):
    strategy = FedAvgStrategy(min_train_nodes=1)
    g = state(0, 0, 0)
    strategy.global_state = g
    msgs = [train_message(n, g) for n in (11, 12, 13)]
    wrong_keys = {"other.weight": torch.zeros(2, 2)}
    replies = [make_reply(msgs[0], state(2, 2, 1), 10), make_reply(msgs[1], state(5, 5, 1), 0),
               make_reply(msgs[2], wrong_keys, 10)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["fc.weight"], torch.full((2, 2), 2.0))
    assert set(strategy.last_report.invalid) == {12, 13}
    assert "num-examples" in strategy.last_report.invalid[12]


def test_too_few_valid_replies_skip_the_round(flower_task_identity):
    strategy = FedAvgStrategy(min_train_nodes=2)
    arrays, _ = run_round(strategy, [(11, state(1, 1, 1), 10)], state(0, 0, 0))
    assert arrays is None and strategy.last_report.skipped


def test_configure_train_gives_each_message_its_own_config(flower_task_identity):
    class PerClient(FedAvgStrategy):
        def client_instructions(self, server_round, node_id):
            return {"mine": node_id}

    class FakeGrid:
        def get_node_ids(self):
            return [21, 22]

    msgs = list(PerClient(min_available_nodes=2).configure_train(1, ArrayRecord(state(0, 0, 0)), ConfigRecord({}),
                                                                 FakeGrid()))
    assert {m.metadata.dst_node_id: m.content["config"]["mine"] for m in msgs} == {21: 21, 22: 22}


def test_truth_is_stripped_before_the_strategy_sees_replies(flower_task_identity):
    g = state(0, 0, 0)
    msgs = [train_message(n, g) for n in (31, 32)]
    replies = [make_reply(msgs[0], state(1, 1, 1), 5, truth=True), make_reply(msgs[1], state(1, 1, 1), 5, truth=False)]

    class Inner:  # replies arrive over two polls
        def push_messages(self, messages):
            return [m.metadata.message_id for m in messages]  # distinct ids, as a real push returns

        def pull_messages(self, ids):
            return [replies.pop(0)] if replies else []

    seen = {}
    grid = TruthStrippingGrid(Inner(), lambda node, mtype, truth: seen.update({node: truth["is-malicious"]}))
    waited = []
    out = grid.send_and_receive(msgs, timeout=5, while_waiting=lambda: waited.append(True))
    assert seen == {31: True, 32: False} and waited == [True] and len(out) == 2
    assert all("truth" not in r.content for r in out)


def test_aggregate_does_not_depend_on_reply_order(flower_task_identity):
    # replies arrive in any order and node ids are random per run; float sums depend on order
    gen = torch.Generator().manual_seed(0)
    states = [{"fc.weight": torch.randn(300, 200, generator=gen), "fc.bias": torch.randn(200, generator=gen)}
              for _ in range(10)]
    g = {k: torch.zeros_like(v) for k, v in states[0].items()}
    results = []
    for order in (list(range(10)), [9, 3, 1, 0, 2, 4, 8, 7, 6, 5]):
        strategy = FedAvgStrategy()
        strategy.global_state = g
        msgs = [train_message(40 + i, g) for i in order]
        replies = [make_reply(m, states[i], 10 + 7 * i) for m, i in zip(msgs, order, strict=True)]
        results.append(strategy.aggregate_train(1, replies)[0].to_torch_state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
