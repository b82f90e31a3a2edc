"""FLTrust: trust bootstrapping from a small clean root data set held by the server.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021, https://arxiv.org/abs/2012.13995 (Algorithm 1 and Eq. 1-4).

Each round the server trains a copy of the global model on its root data set and obtains the server
update g0 (trained - global). For every client update g_i (local - global), over trainable
parameters only:

    TS_i  = ReLU(cos(g_i, g0))                     trust score (Eq. 2)
    ĝ_i   = g_i · ‖g0‖ / ‖g_i‖                     magnitude normalised to the server update (Eq. 3)
    g     = Σ_i TS_i ĝ_i / Σ_i TS_i                aggregate (Eq. 4)
    w_new = w + α · g                              α = `server_lr` (the paper's global learning rate)

Updates are model deltas (local - global) here, so α = 1 reproduces the paper's plain step.

thorn choices:
- The root data set is the server's clean split (`ServerContext`); the paper's default is 100
  examples, `root_size` (null = the whole split) draws a fixed random subset once per run.
- Server training uses the clients' local setup (lr, batch size, momentum, weight decay) with
  `root_epochs` epochs, seeded from (server seed, round) in a forked RNG, so a run is reproducible and
  the server's own RNG stream is not disturbed.
- The new model gets w + α·g on the trainable keys; the other entries (BatchNorm statistics) come from
  the example-weighted FedAvg of the clients with a positive trust score.
- Clients with TS_i = 0 carry no weight; they are reported as rejected (so the records give
  detection TPR/FPR). If every trust score is 0 the global model is kept and `info` says so.
- The recorded weights are the normalised trust scores TS_i / Σ TS_j (the effective coefficient of a
  client's raw update is that times ‖g0‖/‖g_i‖).
"""

from __future__ import annotations

import dataclasses
import zlib
from logging import WARNING

import numpy as np
import torch
from flwr.common import log

from strategies.aggregation import (
    StateDict,
    apply_update,
    flatten_states,
    row_statistics,
    weighted_average_states,
    weighted_row_sum,
)
from strategies.base import AggregationOutcome, ClientUpdate, RobustAggregation, example_weights, update_vectors
from task.train import seed_everything, train_local

# ---- defaults (the config keys, conf/strategy/fltrust.yaml) ---------------------------------------
ROOT_EPOCHS = 1        # local epochs of the server's training on the root data set per round
SERVER_LR = 1.0        # α, the global learning rate
ROOT_SIZE = None       # examples of the server's clean split used as root data (None: all of them)

_TAG = zlib.crc32(b"fltrust")  # separates the server's training seed from the clients' seeds
_EPS = 1e-12


# ---- the math (pure, vectorised over the (n, d) update matrix) -----------------------------------
def trust_scores(dots: torch.Tensor, norms: torch.Tensor, reference_norm: torch.Tensor) -> torch.Tensor:
    """TS_i = ReLU(cos(g_i, g0)) from g_i·g0, ‖g_i‖ and ‖g0‖; 0 where either vector is zero."""
    scale = norms * reference_norm
    return torch.relu(torch.where(scale > _EPS, dots / scale.clamp_min(_EPS), torch.zeros_like(dots)))


def magnitude_factors(norms: torch.Tensor, reference_norm: torch.Tensor) -> torch.Tensor:
    """‖g0‖ / ‖g_i‖: the factor that gives g_i the server update's norm (0 for a zero update)."""
    return torch.where(norms > _EPS, reference_norm / norms.clamp_min(_EPS), torch.zeros_like(norms))


def fltrust_aggregate(updates: torch.Tensor, server_update: torch.Tensor, rows: torch.Tensor | None = None,
                      offset: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(Σ TS_i ĝ_i / Σ TS_i, TS); the aggregate is None when every trust score is 0.

    The updates are updates[rows] - offset when given (models and the global model). Σ TS_i ĝ_i / Σ TS_i
    is a weighted sum of the rows with weights TS_i ‖g0‖ / (‖g_i‖ Σ TS): computed from the rows' norms
    and dot products with g0 over column blocks, never as a rescaled float64 copy of the matrix."""
    g0 = server_update.to(torch.float64)
    squares, dots = row_statistics(updates, rows, offset, against=g0)
    norms, g0_norm = squares.sqrt(), g0.norm()
    ts = trust_scores(dots, norms, g0_norm)
    total = ts.sum()
    dtype = updates.dtype  # results in the input's precision, as computing on the matrix itself would give
    if float(total) <= 0.0:
        return None, ts.to(dtype)
    weights = ts * magnitude_factors(norms, g0_norm) / total
    return weighted_row_sum(updates, weights, rows, offset).to(dtype), ts.to(dtype)


# ---- the strategy ---------------------------------------------------------------------------------
class FLTrustStrategy(RobustAggregation):
    """FLTrust: trust-score-weighted mean of client updates rescaled to the server update's norm."""

    filtering = True  # clients left out of the aggregate are reported as rejected

    needs_server_data = True

    def __init__(self, root_epochs: int = ROOT_EPOCHS, server_lr: float = SERVER_LR,
                 root_size: int | None = ROOT_SIZE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root_epochs = int(root_epochs)
        self.server_lr = float(server_lr)
        self.root_size = None if root_size is None else int(root_size)

    def check_preconditions(self, clients_per_round: int) -> None:
        if self.root_epochs < 1:
            raise ValueError(f"strategy.root_epochs={self.root_epochs} is invalid; allowed: an integer >= 1")
        if not self.server_lr > 0:
            raise ValueError(f"strategy.server_lr={self.server_lr} is invalid; allowed: a number > 0")
        if self.root_size is not None and self.root_size < 1:
            raise ValueError(f"strategy.root_size={self.root_size} is invalid; allowed: null or an integer >= 1")

    def root_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The root data set: the server's clean split, or a fixed random subset of `root_size` of it."""
        ctx = self.server_context
        x, y = np.asarray(ctx.x_val), np.asarray(ctx.y_val)
        if self.root_size is None or self.root_size >= len(y):
            return x, y
        idx = np.sort(np.random.default_rng([int(ctx.seed), _TAG]).choice(len(y), self.root_size, replace=False))
        return x[idx], y[idx]

    def server_model(self, server_round: int, global_state: StateDict) -> StateDict:
        """The global model after `root_epochs` of training on the root data set (on CPU)."""
        ctx = self.server_context
        if ctx is None:
            raise RuntimeError("FLTrust needs the server's clean split: server_context was not set "
                               "(needs_server_data=True and server.val_fraction > 0)")
        x, y = self.root_data()
        cfg = dataclasses.replace(ctx.local, epochs=self.root_epochs)
        device = torch.device(ctx.device)
        fork = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            generator = seed_everything(int(ctx.seed), int(server_round), _TAG, 0)
            model = ctx.build_model()
            model.load_state_dict(global_state)
            train_local(model, x, y, ctx.spec, cfg, device, generator)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        keys = self.keys_for_vectors(global_state)
        server_state = self.server_model(server_round, global_state)
        g0 = (flatten_states([server_state], keys) - flatten_states([global_state], keys))[0].to(torch.float64)
        models, reference = update_vectors(updates, keys, global_state)  # read-only
        aggregate, ts = fltrust_aggregate(models, g0, offset=reference)
        rejected = {u.node_id: "trust score 0: cos(update, server update) <= 0"
                    for u, t in zip(updates, ts, strict=True) if float(t) <= 0.0}
        info = {"server_update_norm": float(g0.norm()), "n_trusted": float(len(updates) - len(rejected)),
                "mean_trust": float(ts.mean()), "all_trust_zero": float(aggregate is None)}
        if aggregate is None:
            log(WARNING, "round %d: FLTrust gave every update trust 0: global model unchanged", server_round)
            return AggregationOutcome(state=None, weights={u.node_id: 0.0 for u in updates}, rejected=rejected,
                                      info=info)
        trusted = [u for u, t in zip(updates, ts, strict=True) if float(t) > 0.0]
        buffers = weighted_average_states([u.state for u in trusted], example_weights(trusted))
        state = apply_update(global_state, (self.server_lr * aggregate).to(torch.float32), keys, buffers_from=buffers)
        weights = ts / ts.sum()
        return AggregationOutcome(state=state, weights={u.node_id: float(w) for u, w in zip(updates, weights,
                                                                                             strict=True)},
                                  rejected=rejected, info=info)
