"""Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498).

Rule: each coordinate of the new model is the median, over the n client models, of that coordinate.
For even n it is the mean of the two middle values (the usual median, numpy's and Flower's `FedMedian`;
`torch.median` would return the lower one). No parameter.

Choices shared by the coordinate-wise rules (this module, `trimmed_mean.py`, `bulyan.py`):
- the rule runs on the trainable parameters only (`keys_for_vectors`), on the updates (local - global):
  median, trimmed mean and Bulyan commute with a translation, so this is the rule applied to the models,
  computed on small numbers;
- the other entries of the state dict (BatchNorm running statistics, `num_batches_tracked`) are taken
  from the example-weighted FedAvg of the clients (of the selected clients, for Bulyan): the rule's
  robustness argument is about parameters, and a median of BatchNorm variances of different clients
  describes no client's activations;
- no client has a weight in a coordinate-wise rule: the reported weights are uniform, 1/n for every
  client. The rules are not weighted by num-examples (neither in the paper nor in Flower).

Flower's `FedMedian` applies the same rule to every array, BatchNorm statistics and integer counters
included; on float-only trainable arrays both agree (tests/test_coordinatewise.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strategies.aggregation import StateDict, apply_update, columnwise, lane_median, lanes, weighted_average_states
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_weights, update_vectors


# ---- the math ------------------------------------------------------------------------------------
def coordinate_median(vectors: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (d,): per-coordinate median; for even n the mean of the two middle values."""
    n = vectors.shape[0]
    if n == 0:
        raise ValueError("the median of no vectors is undefined")
    if vectors.is_cuda:  # selection on the GPU itself
        lower = torch.kthvalue(vectors, (n + 1) // 2, dim=0).values
        return lower if n % 2 else (lower + torch.kthvalue(vectors, n // 2 + 1, dim=0).values) / 2
    return torch.from_numpy(lane_median(lanes(vectors)))


# ---- helpers shared with trimmed_mean.py and bulyan.py --------------------------------------------
def reference_state(global_state: StateDict | None, updates: Sequence[ClientUpdate]) -> StateDict:
    """The model the updates are relative to: the global model, or zeros when the strategy has not
    sent one (a strategy driven directly, as in unit tests)."""
    if global_state is not None:
        return global_state
    return {k: torch.zeros_like(v) for k, v in updates[0].state.items()}


def coordinatewise_rule(rule, global_state: StateDict, updates: Sequence[ClientUpdate], keys: Sequence[str],
                        rows_of: Sequence[int] | None = None) -> torch.Tensor:
    """(d,): `rule` ((k, c) block -> (c,)) over column blocks of the updates (local - global) on `keys`;
    with `rows_of`, of those updates only (positions in `updates`). Never materialises the (n, d)
    matrix of updates: blocks of the models (views of the round's ReplyStack) minus the global model."""
    matrix, reference = update_vectors(list(updates), list(keys), global_state)
    rows = torch.as_tensor(list(rows_of), dtype=torch.long) if rows_of is not None else None
    return columnwise(matrix, rule, rows=rows, offset=reference, threads=torch.get_num_threads())


def robust_state(global_state: StateDict, keys: Sequence[str], update: torch.Tensor,
                 buffer_clients: Sequence[ClientUpdate]) -> StateDict:
    """global + `update` on the trainable `keys`; every other entry (BatchNorm statistics, integer
    buffers) from the example-weighted FedAvg of `buffer_clients`."""
    trainable = set(keys)
    others = [k for k in global_state if k not in trainable]
    buffers: StateDict = {}
    if any(torch.is_floating_point(global_state[k]) for k in others):
        buffers = weighted_average_states([{k: u.state[k] for k in others} for u in buffer_clients],
                                          example_weights(list(buffer_clients)))
    else:  # integer buffers only (or none): the max over clients, as weighted_average_states does
        buffers = {k: torch.stack([u.state[k] for u in buffer_clients]).amax(0) for k in others}
    return apply_update(global_state, update, keys, buffers_from=buffers)


def uniform_weights(updates: Sequence[ClientUpdate]) -> dict[int, float]:
    return {u.node_id: 1.0 / len(updates) for u in updates}


# ---- the strategy --------------------------------------------------------------------------------
class MedianStrategy(RobustAggregation):
    """Coordinate-wise median of the client models (trainable parameters); no parameter."""

    def aggregate_updates(self, server_round: int, global_state: StateDict | None,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        reference = reference_state(global_state, updates)
        keys = self.keys_for_vectors(reference)
        median = coordinatewise_rule(coordinate_median, reference, updates, keys)
        return AggregationOutcome(state=robust_state(reference, keys, median, updates),
                                  weights=uniform_weights(updates))
