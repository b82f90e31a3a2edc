"""FedAvg: the example-count-weighted mean of the client models, no defense (McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017,
https://arxiv.org/abs/1602.05629)."""

from __future__ import annotations

from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_weights, mean_of


class FedAvgStrategy(RobustAggregation):
    """Weighted mean by `num-examples` over the full state dict (integer buffers by max)."""

    category = "none"

    def aggregate_updates(self, server_round: int, global_state, updates: list[ClientUpdate]) -> AggregationOutcome:
        return mean_of(updates, example_weights(updates))
