"""Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018, https://arxiv.org/abs/1802.07927).

Rule, with n client models and f assumed Byzantine (needs n ≥ 4f + 3):
1. selection: θ = n - 2f models are selected with a Byzantine-resilient rule. The paper applies Krum
   recursively: Krum picks one model from the remaining set, which is removed from the set, θ times
   (each Krum call scores the models still remaining, with |remaining| - f - 2 neighbours, clamped to
   at least 1 as Flower clamps Krum's);
2. aggregation: for each coordinate, the β = θ - 2f values closest to the median of the θ selected
   values of that coordinate are averaged.

Defaults (`DEFAULT_*` below): f = 3 (the default attack: 30 % of 10 clients; note that f = 3 needs
n ≥ 15 clients per round); selection "krum" (the paper's recursive Krum).

Flower 1.41's `flwr.serverapp.strategy.Bulyan` differs in step 1: it selects the θ models with the
lowest Krum scores computed once on all n models (one-shot Multi-Krum), not by recursive Krum. The two
can select different sets (tests/test_krum_family.py has a case). `selection="multikrum"` reproduces
Flower's rule and is what the equivalence test uses; the default stays the paper's. Like Flower, a
round with fewer than 4f + 3 replies leaves the global model unchanged (with a warning).

Same choices as `median.py`: trainable parameters only, computed on the updates (distances, medians
and closest-to-median sets do not change under a translation); BatchNorm statistics and integer
buffers from the example-weighted FedAvg of the θ selected clients (Flower applies the rule to every
array). Reported weights: 1/θ for each selected client (every coordinate averages β of them, a
different β per coordinate, so no finer per-client weight exists), 0 for the others, which are
reported as rejected. Ties go to the client first in the strategy's (content-sorted) order.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.common import log

from strategies.aggregation import StateDict, lane_closest_to_median_mean, lanes
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, centred_gram
from strategies.krum import (
    DEFAULT_NUM_MALICIOUS,
    krum_scores_from_distances,
    pairwise_sq_distances,
    rank_by_score,
    sq_distances_from_gram,
)
from strategies.median import coordinate_median, coordinatewise_rule, reference_state, robust_state

DEFAULT_SELECTION = "krum"          # "krum": the paper's recursive Krum; "multikrum": Flower's one-shot
SELECTIONS = ("krum", "multikrum")


# ---- the math ------------------------------------------------------------------------------------
def iterative_krum_select(vectors: torch.Tensor, num_malicious: int, count: int) -> torch.Tensor:
    """(n, d) -> `count` indices, in the order recursive Krum picks them: Krum on the remaining set,
    remove its pick, repeat. The loop runs over picks (at most n), on one (n, n) distance matrix."""
    return iterative_krum_select_from_distances(pairwise_sq_distances(vectors), num_malicious, count)


def iterative_krum_select_from_distances(sq_distances: torch.Tensor, num_malicious: int, count: int) -> torch.Tensor:
    """`iterative_krum_select` on the (n, n) squared distances of the vectors."""
    remaining = torch.arange(sq_distances.shape[0], device=sq_distances.device)
    chosen = []
    for _ in range(count):
        sub = sq_distances[remaining][:, remaining]
        pick = int(rank_by_score(krum_scores_from_distances(sub, num_malicious))[0])
        chosen.append(remaining[pick])
        remaining = torch.cat([remaining[:pick], remaining[pick + 1:]])
    return torch.stack(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def closest_to_median_mean(vectors: torch.Tensor, beta: int) -> torch.Tensor:
    """(θ, d) -> (d,): per coordinate, the mean of the `beta` values closest to the coordinate's median."""
    theta = vectors.shape[0]
    if beta >= theta:
        return vectors.mean(dim=0)
    if vectors.is_cuda:
        median = coordinate_median(vectors)
        closest = torch.topk((vectors - median).abs(), beta, dim=0, largest=False).indices
        return torch.gather(vectors, 0, closest).mean(dim=0)
    # (d, θ): selections along contiguous lanes (aggregation.lanes)
    return torch.from_numpy(lane_closest_to_median_mean(lanes(vectors), beta))


def bulyan_sizes(n: int, num_malicious: int) -> tuple[int, int]:
    """(θ, β) = (n - 2f, n - 4f)."""
    theta = n - 2 * num_malicious
    return theta, theta - 2 * num_malicious


def bulyan_select(sq_distances: torch.Tensor, num_malicious: int, selection: str = DEFAULT_SELECTION) -> torch.Tensor:
    """The θ = n - 2f indices Bulyan's first stage keeps, from the (n, n) squared distances of the models:
    recursive Krum ("krum", the paper's) or the θ best one-shot Krum scores ("multikrum", Flower's)."""
    n = sq_distances.shape[0]
    check_bulyan_preconditions(n, num_malicious, selection)
    theta, _ = bulyan_sizes(n, num_malicious)
    if selection == "krum":
        return iterative_krum_select_from_distances(sq_distances, num_malicious, theta)
    return rank_by_score(krum_scores_from_distances(sq_distances, num_malicious))[:theta]


def bulyan(vectors: torch.Tensor, num_malicious: int,
           selection: str = DEFAULT_SELECTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) -> ((d,) aggregate, the θ selected indices)."""
    selected = bulyan_select(pairwise_sq_distances(vectors), num_malicious, selection)
    _, beta = bulyan_sizes(vectors.shape[0], num_malicious)
    return closest_to_median_mean(vectors[selected], beta), selected


def check_bulyan_preconditions(n: int, num_malicious: int, selection: str = DEFAULT_SELECTION) -> None:
    if not isinstance(num_malicious, int) or isinstance(num_malicious, bool) or num_malicious < 0:
        raise ValueError(f"strategy.num_malicious={num_malicious!r} must be a non-negative integer (f)")
    if n < 4 * num_malicious + 3:
        raise ValueError(f"strategy.num_malicious={num_malicious} needs n >= 4f + 3 = {4 * num_malicious + 3} "
                         f"clients per round for Bulyan, got n={n}")
    if selection not in SELECTIONS:
        raise ValueError(f"strategy.selection={selection!r} is unknown; allowed values: {', '.join(SELECTIONS)}")


# ---- the strategy --------------------------------------------------------------------------------
class BulyanStrategy(RobustAggregation):
    """Recursive-Krum selection of θ = n - 2f models, then per coordinate the mean of the β = n - 4f
    values closest to the median."""

    filtering = True  # clients left out of the aggregate are reported as rejected
    shares_gram = True

    def __init__(self, num_malicious: int = DEFAULT_NUM_MALICIOUS, selection: str = DEFAULT_SELECTION,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious
        self.selection = selection

    def check_preconditions(self, clients_per_round: int) -> None:
        check_bulyan_preconditions(clients_per_round, self.num_malicious, self.selection)

    def aggregate_updates(self, server_round: int, global_state: StateDict | None,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        n, f = len(updates), self.num_malicious
        if n < 4 * f + 3:
            log(WARNING, "round %d: Bulyan with f=%d needs at least %d replies, got %d: global model unchanged",
                server_round, f, 4 * f + 3, n)
            return AggregationOutcome(state=None, weights={})
        reference = reference_state(global_state, updates)
        keys = self.keys_for_vectors(reference)
        # stage 1 on the models (distances do not need the reference), stage 2 on the updates of the
        # selected clients, over column blocks (no copy of the selected rows as a whole)
        selected_idx = bulyan_select(sq_distances_from_gram(centred_gram(updates, keys, reference)), f, self.selection)
        theta, beta = bulyan_sizes(n, f)
        aggregate = coordinatewise_rule(lambda block: closest_to_median_mean(block, beta), reference, updates, keys,
                                        rows_of=selected_idx.tolist())
        selected = [updates[i] for i in selected_idx.tolist()]
        chosen = {u.node_id for u in selected}
        return AggregationOutcome(
            state=robust_state(reference, keys, aggregate, selected),
            weights={u.node_id: (1.0 / theta if u.node_id in chosen else 0.0) for u in updates},
            rejected={u.node_id: f"not selected by Bulyan's {self.selection} stage ({theta}/{n} kept)"
                      for u in updates if u.node_id not in chosen},
            info={"theta": float(theta), "beta": float(beta)})
