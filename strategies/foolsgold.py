"""FoolsGold (Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings",
RAID 2020, https://arxiv.org/abs/1808.04866), Algorithm 1.

Sybils pushing one poisoning objective send updates that look more alike, over time, than honest
clients' do. The server keeps each client's history H_i, the sum of all its past updates
(trainable parameters only), and each round, over the clients in the round:

    cs_ij  = cosine(H_i, H_j)                         for j != i
    v_i    = max_j cs_ij
    cs_ij <- cs_ij * v_i / v_j        where v_j > v_i  (pardoning honest clients that merely
                                                        resemble a sybil)
    alpha_i = 1 - max_j cs_ij
    alpha  <- alpha / max_i alpha,  clipped to [0, 1]
    alpha_i = 0.99 where alpha_i = 1  (keeps the logit finite)
    alpha_i = kappa * (ln(alpha_i / (1 - alpha_i)) + 0.5),  clipped to [0, 1]

Choices made here:
- The optional importance (feature) weighting of the paper is off: similarities use every trainable
  coordinate, unweighted.
- The maxima over j != i are floored at 0 (a negative cosine is no evidence of a sybil). This keeps
  1 - max in [0, 1] and stops pardoning (v_i / v_j with v_i < 0) from turning a negative similarity
  into a positive one; when each client resembles someone (cs >= 0), it is exactly Algorithm 1.
- The aggregation weights are alpha alone, not multiplied by the example counts; the base layer
  normalises them (the paper adds sum_i alpha_i Delta_i unnormalised, which would rescale the step).
- If every alpha is 0 (e.g. all histories identical) the round falls back to uniform weights and
  records `uniform_fallback = 1`.
- Histories are kept per node id (stable for a run) as float32 on the CPU, and only clients taking
  part in the round are compared. `state_dict` / `load_state_dict` checkpoint them.
"""

from __future__ import annotations

from typing import Any

import torch

from strategies.aggregation import StateDict, gram_matrix, row_block
from strategies.base import AggregationOutcome, ClientUpdate, Reweighting, update_vectors
from strategies.stack import ReplyStack

DEFAULTS: dict[str, Any] = {
    "confidence": 1.0,   # kappa: the confidence parameter of the logit
}

LOGIT_CAP = 0.99  # alpha = 1 becomes this before the logit


def foolsgold_weights(histories: torch.Tensor, confidence: float = DEFAULTS["confidence"]) -> torch.Tensor:
    """FoolsGold's alpha (n,) float64 in [0, 1] for an (n, d) matrix of client histories."""
    h = histories.to(torch.float64)
    return foolsgold_weights_from_gram(h @ h.T, confidence)


def foolsgold_weights_from_gram(gram: torch.Tensor, confidence: float = DEFAULTS["confidence"]) -> torch.Tensor:
    """`foolsgold_weights` from the (n, n) float64 Gram matrix of the histories (what the strategy computes
    over column blocks, without stacking the histories)."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    scale = (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    cs = (gram / scale).clamp(-1.0, 1.0)  # a zero history has cosine 0 with every other
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    masked = cs.masked_fill(~off_diagonal, float("-inf"))
    v = masked.amax(dim=1).clamp_min(0.0)                       # v_i = max_{j != i} cs_ij, floored at 0
    pardon = v[None, :] > v[:, None]                             # [i, j]: v_j > v_i
    ratio = v[:, None] / v[None, :].clamp_min(torch.finfo(torch.float64).tiny)
    cs = torch.where(pardon, cs * ratio, cs)
    max_cs = cs.masked_fill(~off_diagonal, float("-inf")).amax(dim=1).clamp_min(0.0)
    alpha = 1.0 - max_cs
    top = alpha.max()
    if not bool(top > 0):
        return torch.zeros(n, dtype=torch.float64)
    alpha = (alpha / top).clamp(0.0, 1.0)
    alpha = torch.where(alpha >= 1.0, torch.tensor(LOGIT_CAP, dtype=torch.float64), alpha)
    alpha = confidence * (torch.log(alpha / (1.0 - alpha)) + 0.5)  # ln 0 = -inf, clipped to 0 below
    return alpha.clamp(0.0, 1.0)


class FoolsGoldStrategy(Reweighting):
    """FoolsGold: each client's weight is alpha_i from the cosine similarity of its update history
    with the others' (`confidence` = kappa); weights not multiplied by example counts."""

    def __init__(self, confidence: float = DEFAULTS["confidence"], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.confidence = float(confidence)
        self.histories: dict[int, torch.Tensor] = {}
        self._round_info: dict[str, float] = {}

    def check_preconditions(self, clients_per_round: int) -> None:
        if not self.confidence > 0:
            raise ValueError(f"strategy.confidence={self.confidence!r} is invalid; allowed: confidence > 0")

    def state_dict(self) -> dict[str, Any]:
        return {"histories": {int(node): h.clone() for node, h in self.histories.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.histories = {int(node): h.detach().to("cpu", torch.float32).clone()
                          for node, h in state.get("histories", {}).items()}

    def client_weights(self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]) -> torch.Tensor:
        keys = self.keys_for_vectors(global_state)
        models, reference = update_vectors(updates, keys, global_state)  # read-only
        for i, u in enumerate(updates):  # one update at a time: no (clients x parameters) copy
            delta = row_block(models, torch.tensor([i]), 0, models.shape[1], reference)[0]
            previous = self.histories.get(u.node_id)
            self.histories[u.node_id] = delta.clone() if previous is None else previous + delta
        # the histories' Gram matrix over column blocks, read in place as the rows of a ReplyStack
        histories = ReplyStack({"history": self.histories[updates[0].node_id]}, ["history"])
        for u in updates:
            histories.append({"history": self.histories[u.node_id]})
        gram = gram_matrix(histories.columns(range(len(updates))), precise=True)
        alpha = foolsgold_weights_from_gram(gram, self.confidence)
        fallback = not bool(alpha.sum() > 0)
        self._round_info = {"uniform_fallback": float(fallback), "zero_weight": float((alpha == 0).sum()),
                            "min_alpha": float(alpha.min()), "max_alpha": float(alpha.max())}
        return torch.ones_like(alpha) if fallback else alpha

    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        outcome = super().aggregate_updates(server_round, global_state, updates)
        outcome.info = dict(self._round_info)
        return outcome
