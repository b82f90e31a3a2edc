"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017,
https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html).

Rule: with n client models and f assumed Byzantine, the score of client i is the sum of the squared
Euclidean distances from its model to its n - f - 2 nearest other models. Krum keeps the client with
the lowest score and its model becomes the global model; Multi-Krum keeps the m lowest-scoring
clients and averages them. Krum needs n > 2f + 2; Multi-Krum needs 1 ≤ m ≤ n - f (more than n - f
would keep a Byzantine client even when the scores rank all of them last).

Defaults (`DEFAULT_*` below): f = 3 (the default attack: 30 % of 10 clients); Multi-Krum m = n - f
(the value of the paper's experiments; Flower's `MultiKrum` defaults to m = 1, which is Krum).

Choices, and where Flower 1.41 (`flwr.serverapp.strategy.Krum` / `MultiKrum`) differs:
- distances are computed on the trainable parameters only (`keys_for_vectors`); Flower uses every
  array, BatchNorm statistics and integer counters included. Distances between models equal distances
  between updates, so no global model is needed;
- the m kept models are averaged weighted by num-examples, as Flower does (and as FedAvg does); the
  paper averages them uniformly (its workers all use the same batch size, where both coincide).
  `weighted=False` gives the paper's plain mean. The full state dict is averaged (BatchNorm statistics
  included, integer buffers by max); for Krum it is the kept client's model itself;
- when a round has fewer replies than planned and n ≤ 2f + 2, the neighbour count is clamped to
  max(1, n - f - 2) as Flower does (with a warning), and m to at most max(1, n - f);
- ties in score go to the client first in the strategy's (content-sorted) order.
Both agree with Flower on float-only trainable arrays (tests/test_krum_family.py).

Detection metrics: clients not kept are "rejected" (reason: their score rank).
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.common import log

from strategies.aggregation import StateDict, columnwise, gram_matrix
from strategies.base import (
    AggregationOutcome,
    AnomalyDetection,
    ClientUpdate,
    centred_gram,
    example_mean,
    mean_of,
)

DEFAULT_NUM_MALICIOUS = 3     # f: Byzantine clients tolerated
DEFAULT_NUM_SELECTED = None   # m (Multi-Krum): None -> n - f
DEFAULT_WEIGHTED = True       # Multi-Krum: average the m kept models by num-examples (False: plain mean)


# ---- the math ------------------------------------------------------------------------------------
def pairwise_sq_distances(vectors: torch.Tensor, rows: torch.Tensor | None = None,
                          centre: torch.Tensor | None = None) -> torch.Tensor:
    """(n, d) -> (n, n) float64 squared Euclidean distances, exactly symmetric with a zero diagonal.
    With `rows`, the distances between vectors[rows].

    From one Gram matrix of the rows minus a common centre (`aggregation.gram_matrix`): distances do not
    change, and centring keeps |x|² + |y|² - 2x·y from cancelling catastrophically when the models are far
    from the origin and close to each other. The centre is the rows' mean, or `centre` when given (the
    global model, which every client model is close to, saves the pass over the matrix that the mean costs)."""
    if centre is None and (vectors.shape[0] if rows is None else len(rows)):
        centre = columnwise(vectors, lambda block: block.mean(dim=0), rows=rows)
    return sq_distances_from_gram(gram_matrix(vectors, rows, centre))


def sq_distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """(n, n) Gram matrix of centred vectors -> their (n, n) squared distances (symmetric, zero diagonal)."""
    sq_norms = gram.diagonal()
    d2 = (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min(0)
    d2 = (d2 + d2.T) / 2
    return d2.fill_diagonal_(0)


def num_neighbours(n: int, num_malicious: int) -> int:
    """n - f - 2, clamped to [1, n - 1] (Flower's clamp for rounds below Krum's n > 2f + 2)."""
    return min(max(n - num_malicious - 2, 1), n - 1)


def krum_scores_from_distances(sq_distances: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """(n, n) squared distances -> (n,) Krum scores: the sum of each row's n - f - 2 smallest
    off-diagonal entries."""
    n = sq_distances.shape[0]
    k = num_neighbours(n, num_malicious)
    if k <= 0:  # a single client: nothing to compare with
        return torch.zeros(n, dtype=sq_distances.dtype, device=sq_distances.device)
    off_diagonal = sq_distances.clone().fill_diagonal_(float("inf"))
    return torch.topk(off_diagonal, k, dim=1, largest=False).values.sum(dim=1)


def krum_scores(vectors: torch.Tensor, num_malicious: int, rows: torch.Tensor | None = None,
                centre: torch.Tensor | None = None) -> torch.Tensor:
    """(n, d) -> (n,) Krum scores (lower is more central); with `rows`, of vectors[rows]."""
    return krum_scores_from_distances(pairwise_sq_distances(vectors, rows, centre), num_malicious)


def rank_by_score(scores: torch.Tensor) -> torch.Tensor:
    """Indices from the lowest score up; ties keep the input order."""
    return torch.argsort(scores, stable=True)


def multikrum_select(vectors: torch.Tensor, num_malicious: int, num_selected: int) -> torch.Tensor:
    """(n, d) -> the indices of the `num_selected` lowest Krum scores, best first."""
    return rank_by_score(krum_scores(vectors, num_malicious))[:num_selected]


def krum_select(vectors: torch.Tensor, num_malicious: int) -> int:
    """(n, d) -> the index of the lowest Krum score."""
    return int(multikrum_select(vectors, num_malicious, 1)[0])


def check_krum_preconditions(n: int, num_malicious: int, rule: str) -> None:
    if not isinstance(num_malicious, int) or isinstance(num_malicious, bool) or num_malicious < 0:
        raise ValueError(f"strategy.num_malicious={num_malicious!r} must be a non-negative integer (f)")
    if n <= 2 * num_malicious + 2:
        raise ValueError(f"strategy.num_malicious={num_malicious} needs n > 2f + 2 = {2 * num_malicious + 2} "
                         f"clients per round for {rule}, got n={n}")


# ---- the strategies ------------------------------------------------------------------------------
class MultiKrumStrategy(AnomalyDetection):
    """Keep the m clients with the lowest Krum scores, average them (by num-examples unless
    `weighted=False`); the others are rejected."""

    rule = "multikrum"
    shares_gram = True          # Krum's distances come from the round's validation pass
    shares_example_sum = True   # and so does the sum the kept models' mean starts from

    def __init__(self, num_malicious: int = DEFAULT_NUM_MALICIOUS, num_selected: int | None = DEFAULT_NUM_SELECTED,
                 weighted: bool = DEFAULT_WEIGHTED, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious
        self.num_selected = num_selected
        self.weighted = bool(weighted)

    def check_preconditions(self, clients_per_round: int) -> None:
        n, f, m = clients_per_round, self.num_malicious, self.num_selected
        check_krum_preconditions(n, f, self.rule)
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= n - f):
            raise ValueError(f"strategy.num_selected={m!r} must be an integer with 1 <= m <= n - f = {n - f} "
                             f"(n={n} clients per round, f={f}), or null for n - f")

    def selected_count(self, n: int) -> int:
        wanted = n - self.num_malicious if self.num_selected is None else self.num_selected
        return max(1, min(wanted, n - self.num_malicious))

    def _ranking(self, server_round: int, updates: list[ClientUpdate],
                 global_state: StateDict | None) -> tuple[list[int], int]:
        n, f = len(updates), self.num_malicious
        if n <= 2 * f + 2:
            log(WARNING, "round %d: %s with f=%d needs more than %d replies, got %d: using %d neighbours",
                server_round, self.rule, f, 2 * f + 2, n, num_neighbours(n, f))
        keys = self.keys_for_vectors(updates[0].state)
        # distances between models equal distances between updates; the global model only centres them
        gram = centred_gram(updates, keys, global_state or updates[0].state)
        scores = krum_scores_from_distances(sq_distances_from_gram(gram), f)
        return rank_by_score(scores).tolist(), self.selected_count(n)

    def _rejections(self, updates: list[ClientUpdate], order: list[int], m: int) -> dict[int, str]:
        n = len(updates)
        return {updates[i].node_id: f"{self.rule} score rank {rank + 1}/{n} ({m} kept)"
                for rank, i in enumerate(order) if rank >= m}

    def detect(self, server_round: int, global_state: StateDict | None,
               updates: list[ClientUpdate]) -> dict[int, str]:
        order, m = self._ranking(server_round, updates, global_state)
        return self._rejections(updates, order, m)

    def aggregate_updates(self, server_round: int, global_state: StateDict | None,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        order, m = self._ranking(server_round, updates, global_state)
        kept = [updates[i] for i in order[:m]]
        outcome = example_mean(kept) if self.weighted else mean_of(kept, torch.ones(len(kept), dtype=torch.float64))
        outcome.rejected = self._rejections(updates, order, m)
        outcome.weights.update({node: 0.0 for node in outcome.rejected})
        outcome.info = {"num_selected": float(m),
                        "num_neighbours": float(num_neighbours(len(updates), self.num_malicious))}
        return outcome


class KrumStrategy(MultiKrumStrategy):
    """Keep the single client with the lowest Krum score: its model is the new global model."""

    rule = "krum"
    shares_example_sum = False  # the kept model is one client's: no mean

    def __init__(self, num_malicious: int = DEFAULT_NUM_MALICIOUS, **kwargs) -> None:
        super().__init__(num_malicious=num_malicious, num_selected=1, **kwargs)
