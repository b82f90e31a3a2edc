"""FedAvg: the example-count-weighted mean of the client models, no defense (McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017,
https://arxiv.org/abs/1602.05629)."""

from __future__ import annotations

from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_mean


class FedAvgStrategy(RobustAggregation):
    """Weighted mean by `num-examples` over the full state dict (integer buffers by max)."""

    category = "none"
    shares_example_sum = True  # the mean comes from the round's validation pass (base.example_mean)

    def aggregate_updates(self, server_round: int, global_state, updates: list[ClientUpdate]) -> AggregationOutcome:
        return example_mean(updates)
