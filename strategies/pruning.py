"""Federated pruning, fine-tuning and extreme-weight adjustment: Wu, Yang, Zhu, Mitra, "Toward Cleansing
Backdoored Neural Networks in Federated Learning", ICDCS 2022 (arXiv 2011.01767, "Mitigating Backdoor
Attacks in Federated Learning", https://arxiv.org/abs/2011.01767).

A post-training defense: ordinary FedAvg trains the model; after the last round the server cleanses it,
without seeing any client data, in phases that are Flower messages (spec: shared/specs/algorithms.md §2):

1a. rank, `query.pruning_activations`: each client reports the mean post-ReLU activation of every channel
    of the last conv layer (for models without convolutions: every unit of the last hidden layer) on its
    own data; the server aggregates them (`agg`) into a global pruning sequence, most dormant first.
1b. rate, `query.pruning_accuracy`: each client reports its local accuracy for every candidate rate r of
    the grid (the first ⌊r·C⌋ channels of the sequence removed); the server aggregates the accuracies
    (`accuracy_agg`: weighted mean, or the median, which a minority of lying clients cannot move far) and
    keeps r* = max{r : Acc(0) − Acc(r) ≤ τ}.
2.  fine-tune: `finetune_rounds` ordinary train rounds with the mask in every train message; the client
    half re-applies it after every local step, the server after aggregation.
3.  adjust (server only): the layer's weights outside μ ± δσ are set to 0.

When (`schedule`): `final` (default, the paper) runs the phases once, after the last round. `periodic`
(the spec's optional mode; the third-party re-implementation's harness prunes and adjusts every 5 rounds)
also runs 1a, 1b and 3 right after the aggregation of every training round t with t % `every` == 0 and
t < num_rounds (the last round is left to the final cleansing above, which still runs). The event's
figures go into that round's metrics.jsonl row (`defense`: rate, channels removed, weights adjusted), and
the round's MA/ASR are those of the pruned model. Between events [INFERRED, the re-implementation holds
nothing]: the mask is held, i.e. sent in every train message, re-applied by the clients after every step
and by the server after every aggregation, so removed channels stay removed instead of regrowing; a later
event (and the final cleansing) ranks the held channels first and keeps them removed, so the rate counts
every removed channel and the mask only grows. Adjusted extreme weights are not held (only channels are).

Removing a channel zeroes its filter (weight and bias) and the following BatchNorm's γ and β: with β kept,
BN would keep the "removed" channel alive.

Provenance of the defaults (see the spec's tags): δ = 3 and `every` = 5 (periodic mode) are the
third-party re-implementation's values; the candidate grid (0 to 0.9 in steps of 0.05), τ = 0.05, 5
fine-tuning rounds and 640 activation samples per client (the re-implementation's 10 batches of 64) are
[INFERRED]. The extreme-weight statistics are taken over the layer's unpruned filters ([INFERRED]: the
zeros of the removed filters would shrink σ and flag ordinary weights); `adjust_stats=filter` takes μ, σ
per filter instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from torch import nn

from strategies.aggregation import StateDict
from strategies.base import (
    AggregationOutcome,
    ClientHalf,
    ClientUpdate,
    PostTrainingDefense,
    example_mean,
)

ACTIVATIONS_ACTION = "pruning_activations"   # query.pruning_activations: phase 1a
ACCURACY_ACTION = "pruning_accuracy"         # query.pruning_accuracy: phase 1b
MASK_KEY = "pruning-mask"                    # train-message ArrayRecord {"keep": float 0/1 per channel}
RESULT_KEY = "pruning"                       # query-reply ArrayRecord {"activations": (C,)}

AGG_OPTIONS = ("mean_activation", "mean_rank", "vote")
ACCURACY_AGG_OPTIONS = ("weighted_mean", "median")
ADJUST_STATS_OPTIONS = ("layer", "filter")
SCHEDULE_OPTIONS = ("final", "periodic")

DEFAULT_RATES = tuple(round(0.05 * i, 2) for i in range(19))  # 0, 0.05, ..., 0.9 [INFERRED]
DEFAULT_TOLERANCE = 0.05       # τ: accepted drop of the aggregated client accuracy [INFERRED]
DEFAULT_FINETUNE_ROUNDS = 5    # T_ft [INFERRED]
DEFAULT_DELTA = 3.0            # δ: extreme weights lie outside μ ± δσ (third-party implementation)
DEFAULT_ACTIVATION_SAMPLES = 640
DEFAULT_VOTE_SHARE = 0.5       # agg=vote: each client votes for its most dormant half of the channels
DEFAULT_EVERY = 5              # p: schedule=periodic prunes after every p-th round (third-party harness)


# ---- which layer ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruningTarget:
    """The layer whose output channels (conv) or units (linear) are removed, found from a state dict."""

    layer: str            # module name, e.g. "features.25" or "conv3"
    norm: str | None      # the BatchNorm right after it, if any
    channels: int
    kind: str             # "conv" or "linear"

    def keys(self, state: StateDict) -> list[str]:
        """The state-dict entries whose rows are zeroed to remove a channel."""
        names = [f"{self.layer}.weight", f"{self.layer}.bias"]
        if self.norm is not None:
            names += [f"{self.norm}.weight", f"{self.norm}.bias"]
        return [k for k in names if k in state]


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def find_pruning_target(state: StateDict) -> PruningTarget:
    """The last conv layer (a 4-D `.weight`) or, without convolutions, the last hidden linear layer (the
    second-to-last 2-D `.weight`), plus the BatchNorm that directly follows it in state-dict order.

    It reads only key names and shapes, so the server (which holds a state dict, not a model) and the
    clients (which hold the model) agree on the layer."""
    keys = list(state)
    weights = [k for k in keys if k.endswith(".weight")]
    convs = [k for k in weights if state[k].dim() == 4]
    if convs:
        weight_key, kind = convs[-1], "conv"
    else:
        linears = [k for k in weights if state[k].dim() == 2]
        if len(linears) < 2:
            raise ValueError("pruning needs a conv layer or a hidden linear layer; the model has neither")
        weight_key, kind = linears[-2], "linear"
    layer = _module_of(weight_key)
    channels = int(state[weight_key].shape[0])
    norm = None
    # the first module after the layer: a BatchNorm of the same width (it has running statistics), or
    # any other weight-carrying module, in which case there is none
    for key in keys[keys.index(weight_key) + 1:]:
        module = _module_of(key)
        if module == layer:
            continue
        if f"{module}.running_mean" in state and state[f"{module}.running_mean"].shape == (channels,):
            norm = module
        break
    return PruningTarget(layer=layer, norm=norm, channels=channels, kind=kind)


# ---- masks -----------------------------------------------------------------------------------------
def keep_mask(order: torch.Tensor, channels: int, rate: float) -> torch.Tensor:
    """Bool (C,): False for the first ⌊rate·C⌋ channels of the pruning sequence `order`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    keep = torch.ones(channels, dtype=torch.bool)
    keep[order[: int(rate * channels + 1e-9)]] = False  # +1e-9: 0.3 * 10 is 2.9999... in floating point
    return keep


def _row_mask(keep: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    return keep.to(dtype=tensor.dtype, device=tensor.device).reshape(-1, *([1] * (tensor.dim() - 1)))


def apply_mask(state: StateDict, target: PruningTarget, keep: torch.Tensor) -> StateDict:
    """A copy of `state` with the removed channels zeroed (filter, bias, BN γ and β)."""
    out = dict(state)
    for key in target.keys(state):
        out[key] = state[key] * _row_mask(keep, state[key])
    return out


@torch.no_grad()
def apply_mask_to_model(model: nn.Module, target: PruningTarget, keep: torch.Tensor) -> None:
    """Zero the removed channels of `model` in place (after every local step of fine-tuning)."""
    params = dict(model.named_parameters())
    for key in target.keys(params):
        params[key].mul_(_row_mask(keep, params[key]))


# ---- phase 1a: activations and the pruning sequence ------------------------------------------------
@torch.no_grad()
def mean_channel_activations(model: nn.Module, target: PruningTarget, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean post-ReLU activation per channel (over samples and positions) of the target layer, read after
    its BatchNorm when it has one. The hook reads the output before any in-place ReLU overwrites it."""
    module = model.get_submodule(target.norm or target.layer)
    total = torch.zeros(target.channels, dtype=torch.float64)
    count = 0

    def hook(_module, _inputs, output):
        nonlocal total, count
        act = torch.relu(output).to(torch.float64)
        dims = [d for d in range(act.dim()) if d != 1]  # all but the channel axis
        per_position = act.numel() // act.shape[1]
        total += act.sum(dim=dims).cpu()
        count += per_position

    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        for xb in batches:
            model(xb)
    finally:
        handle.remove()
    return (total / max(count, 1)).to(torch.float32)


def ascending_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of every entry, 0 for the smallest (ties broken by index, so ranks are a permutation)."""
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[torch.argsort(values, stable=True)] = torch.arange(len(values), dtype=torch.float64)
    return ranks


def pruning_sequence(activations: list[torch.Tensor], counts: list[int], agg: str = "mean_activation",
                     vote_share: float = DEFAULT_VOTE_SHARE) -> torch.Tensor:
    """The global pruning sequence: channel indices, most dormant first.

    mean_activation: the example-weighted mean of the clients' activations, ascending;
    mean_rank: the mean of the clients' ascending ranks (every client counts once);
    vote: each client votes for its ⌈vote_share·C⌉ most dormant channels; most votes first, ties by mean rank.
    """
    if agg not in AGG_OPTIONS:
        raise ValueError(f"agg={agg!r} is invalid; allowed: {', '.join(AGG_OPTIONS)}")
    acts = torch.stack([a.to(torch.float64) for a in activations])
    ranks = torch.stack([ascending_ranks(a) for a in acts])
    if agg == "mean_activation":
        w = torch.tensor(counts, dtype=torch.float64)
        return torch.argsort((w[:, None] * acts).sum(0) / w.sum(), stable=True)
    mean_rank = ranks.mean(0)
    if agg == "mean_rank":
        return torch.argsort(mean_rank, stable=True)
    channels = acts.shape[1]
    votes = (ranks < int(np.ceil(vote_share * channels))).sum(0).to(torch.float64)
    # sort key: more votes first; among equal votes, lower mean rank first (mean rank < C keeps them apart)
    return torch.argsort(-votes * channels + mean_rank, stable=True)


# ---- phase 1b: the pruning rate --------------------------------------------------------------------
def aggregate_accuracies(accuracies: torch.Tensor, counts: list[int], how: str = "weighted_mean") -> torch.Tensor:
    """(clients, rates) -> (rates,): the example-weighted mean, or the per-rate median over clients."""
    if how not in ACCURACY_AGG_OPTIONS:
        raise ValueError(f"accuracy_agg={how!r} is invalid; allowed: {', '.join(ACCURACY_AGG_OPTIONS)}")
    acc = accuracies.to(torch.float64)
    if how == "median":
        # the mean of the two middle values for an even count: the lower median would bias the drop
        return torch.quantile(acc, 0.5, dim=0)
    w = torch.tensor(counts, dtype=torch.float64)
    return (w[:, None] * acc).sum(0) / w.sum()


def choose_rate(rates: list[float], accuracy: torch.Tensor, tolerance: float) -> int:
    """Index of r* = max{r : Acc(r_0) − Acc(r) ≤ τ}, where r_0 is the grid's first rate (0)."""
    ok = [i for i in range(len(rates)) if float(accuracy[0] - accuracy[i]) <= tolerance + 1e-12]
    return max(ok, key=lambda i: rates[i])


@torch.no_grad()
def accuracy_per_rate(model: nn.Module, target: PruningTarget, order: torch.Tensor, rates: list[float],
                      evaluate) -> list[float]:
    """`evaluate(model)` (a clean accuracy) with the first ⌊r·C⌋ channels of `order` removed, for every r."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    try:
        for rate in rates:
            model.load_state_dict(apply_mask(original, target, keep_mask(order, target.channels, rate)))
            out.append(float(evaluate(model)))
    finally:
        model.load_state_dict(original)
    return out


# ---- phase 3: extreme weights ----------------------------------------------------------------------
def extreme_weight_mask(weight: torch.Tensor, delta: float = DEFAULT_DELTA, per_filter: bool = False,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the weights outside μ ± δσ. μ, σ over the whole layer (or per filter), counting only the
    filters `keep` marks as kept: a removed filter is all zeros and is never flagged."""
    w = weight.detach().to(torch.float64)
    kept = torch.ones(w.shape[0], dtype=torch.bool) if keep is None else keep.to(torch.bool).cpu()
    flagged = torch.zeros_like(w, dtype=torch.bool)
    if not kept.any():
        return flagged
    if per_filter:
        rows = w[kept].reshape(int(kept.sum()), -1)
        mu = rows.mean(1, keepdim=True)
        sigma = rows.std(1, keepdim=True)
        flagged[kept] = ((rows - mu).abs() > delta * sigma).reshape(w[kept].shape)
    else:
        mu, sigma = w[kept].mean(), w[kept].std()
        flagged[kept] = (w[kept] - mu).abs() > delta * sigma
    return flagged


def adjust_extreme_weights(state: StateDict, target: PruningTarget, delta: float = DEFAULT_DELTA,
                           per_filter: bool = False, keep: torch.Tensor | None = None) -> tuple[StateDict, int]:
    """A copy of `state` with the target layer's extreme weights set to 0, and how many were changed."""
    key = f"{target.layer}.weight"
    flagged = extreme_weight_mask(state[key], delta, per_filter, keep).to(state[key].device)
    out = dict(state)
    out[key] = state[key].masked_fill(flagged, 0.0)
    return out, int(flagged.sum())


# ---- the client half -------------------------------------------------------------------------------
def _local_sample(client: Any, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Up to `limit` of the client's own samples, a seeded draw (partitions may be ordered by class)."""
    x, y = client.x, client.y
    if limit is None or limit <= 0 or limit >= len(y):
        return x, y
    rng = np.random.default_rng([int(client.cfg.seed), int(client.partition_id)])
    idx = np.sort(rng.choice(len(y), size=int(limit), replace=False))
    return x[idx], y[idx]


class PruningClientHalf(ClientHalf):
    """Answers the two queries on the client's own (clean) data and holds the mask during fine-tuning."""

    query_actions = (ACTIVATIONS_ACTION, ACCURACY_ACTION)

    def __init__(self, state: RecordDict, client: Any) -> None:
        super().__init__(state, client)
        self.target: PruningTarget | None = None
        self.keep: torch.Tensor | None = None

    def before_training(self, content: RecordDict, server_round: int) -> None:
        if MASK_KEY not in content.array_records:  # ordinary training rounds carry no mask
            return
        self.target = find_pruning_target(self.client.model.state_dict())
        self.keep = content.array_records[MASK_KEY].to_torch_state_dict()["keep"] > 0.5
        if self.keep.shape != (self.target.channels,):
            raise ValueError(f"pruning mask has {tuple(self.keep.shape)} entries, layer {self.target.layer} "
                             f"has {self.target.channels} channels")

    def after_step(self, model: nn.Module) -> None:
        if self.keep is not None:
            apply_mask_to_model(model, self.target, self.keep)

    def query(self, action: str, content: RecordDict) -> RecordDict:
        from task.data import to_unit_float
        from task.train import evaluate_loss_accuracy

        config = dict(content["config"]) if "config" in content.config_records else {}
        model, spec, device = self.client.model.to(self.client.device), self.client.data.spec, self.client.device
        target = find_pruning_target(model.state_dict())
        if action == ACTIVATIONS_ACTION:
            x, _ = _local_sample(self.client, int(config.get("samples", DEFAULT_ACTIVATION_SAMPLES)))
            batch = int(config.get("batch-size", 256))
            batches = (spec.to_model_input(to_unit_float(x[s:s + batch]).to(device)) for s in range(0, len(x), batch))
            acts = mean_channel_activations(model, target, batches)
            return RecordDict({RESULT_KEY: ArrayRecord({"activations": acts}),
                               "metrics": MetricRecord({"num-examples": len(x)})})
        if action == ACCURACY_ACTION:
            samples = int(config.get("samples", 0))
            x, y = _local_sample(self.client, samples if samples > 0 else None)
            order = torch.tensor(list(config["order"]), dtype=torch.long)
            rates = [float(r) for r in config["rates"]]
            accs = accuracy_per_rate(model, target, order, rates,
                                     lambda m: evaluate_loss_accuracy(m, x, y, spec, device)[1])
            return RecordDict({"metrics": MetricRecord({"accuracy": accs, "num-examples": len(y)})})
        raise NotImplementedError(f"{type(self).__name__} answers no query '{action}'")


# ---- the strategy ----------------------------------------------------------------------------------
class FederatedPruningStrategy(PostTrainingDefense):
    """FedAvg during training; after it, rank → choose rate → fine-tune → adjust extreme weights.

    `post_train_phases` lists one entry per phase (train, prune, finetune, adjust) with the model after
    it; the ServerApp evaluates each and writes one metrics.jsonl row per phase (column `phase`).

    With `schedule="periodic"`, `aggregate_train` also runs rank → choose rate → adjust after every
    `every`-th training round before the last (`num_rounds`) and holds the mask from then on."""

    client_half = PruningClientHalf
    shares_example_sum = True  # the FedAvg mean comes from the round's validation pass (base.example_mean)

    def __init__(self, agg: str = "mean_activation", accuracy_agg: str = "weighted_mean",
                 tolerance: float = DEFAULT_TOLERANCE, rates: list[float] | None = None,
                 finetune_rounds: int = DEFAULT_FINETUNE_ROUNDS, delta: float = DEFAULT_DELTA,
                 adjust_stats: str = "layer", activation_samples: int = DEFAULT_ACTIVATION_SAMPLES,
                 accuracy_samples: int = 0, vote_share: float = DEFAULT_VOTE_SHARE, query_timeout: float = 600.0,
                 schedule: str = "final", every: int = DEFAULT_EVERY, num_rounds: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule, self.every, self.num_rounds = schedule, every, num_rounds
        self.agg, self.accuracy_agg, self.adjust_stats = agg, accuracy_agg, adjust_stats
        self.tolerance, self.delta, self.vote_share = float(tolerance), float(delta), float(vote_share)
        self.rates = [float(r) for r in (rates if rates is not None else DEFAULT_RATES)]
        self.finetune_rounds = int(finetune_rounds)
        self.activation_samples, self.accuracy_samples = int(activation_samples), int(accuracy_samples)
        self.query_timeout = float(query_timeout)
        self.keep: torch.Tensor | None = None  # the mask, sent with every train message while it is held
        self.post_train_phases: list[dict[str, Any]] = []
        # Flower hands the grid to configure_train but not to aggregate_train, where a periodic event
        # queries the clients; the grid of the round being aggregated is kept here
        self._grid: Grid | None = None
        self._check_options()

    def _check_options(self) -> None:
        for key, value, allowed in (("agg", self.agg, AGG_OPTIONS),
                                    ("accuracy_agg", self.accuracy_agg, ACCURACY_AGG_OPTIONS),
                                    ("adjust_stats", self.adjust_stats, ADJUST_STATS_OPTIONS)):
            if value not in allowed:
                raise ValueError(f"strategy.{key}={value!r} is invalid; allowed: {', '.join(allowed)}")
        if not self.rates or self.rates[0] != 0.0 or any(not 0 <= r < 1 for r in self.rates) \
                or sorted(self.rates) != self.rates:
            raise ValueError(f"strategy.rates={self.rates} is invalid; allowed: increasing rates in [0, 1) from 0")
        if self.finetune_rounds < 0 or self.delta <= 0 or self.tolerance < 0:
            raise ValueError("strategy.finetune_rounds must be >= 0, strategy.delta > 0, strategy.tolerance >= 0")
        if self.schedule not in SCHEDULE_OPTIONS:
            raise ValueError(f"strategy.schedule={self.schedule!r} is invalid; allowed: {', '.join(SCHEDULE_OPTIONS)}")
        if self.schedule == "periodic":
            # bool is an int subclass: every=true must not pass as 1
            if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
                raise ValueError(f"strategy.every={self.every!r} is invalid; allowed: an integer >= 1 "
                                 "(schedule=periodic prunes after every `every`-th round)")
            if not isinstance(self.num_rounds, int) or self.num_rounds < 1:
                raise ValueError(f"strategy.num_rounds={self.num_rounds!r} is invalid; allowed: the run's num_rounds "
                                 "(conf/strategy/pruning.yaml sets ${num_rounds}), which schedule=periodic needs")
            if self.every >= self.num_rounds:
                # no round before the last is a multiple of `every`: the run would be schedule=final
                raise ValueError(f"strategy.every={self.every} is invalid with num_rounds={self.num_rounds}; allowed: "
                                 f"1 <= every < num_rounds, so that some round before the last prunes")

    # FedAvg during training and fine-tuning; while a mask is held, its channels are zeroed again after
    # the mean (a client that ignored the mask, or an attacker, cannot revive them)
    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        outcome = example_mean(updates)
        if self.keep is not None:
            outcome.state = apply_mask(outcome.state, find_pruning_target(outcome.state), self.keep)
            outcome.info = {**outcome.info, "n_pruned_held": int((~self.keep).sum())}
        return outcome

    def client_records(self, server_round: int, node_id: int) -> dict[str, ArrayRecord | ConfigRecord]:
        if self.keep is None:
            return {}
        return {MASK_KEY: ArrayRecord({"keep": self.keep.to(torch.float32)})}

    # a resumed periodic run must keep holding the mask of its earlier events
    def state_dict(self) -> dict[str, Any]:
        return {"keep": None if self.keep is None else self.keep.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keep = state.get("keep")
        self.keep = None if keep is None else torch.as_tensor(keep, dtype=torch.bool)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        return super().configure_train(server_round, arrays, config, grid)

    def periodic_event_due(self, server_round: int) -> bool:
        """schedule=periodic: prune after round t when t % every == 0, except the last training round (the
        final cleansing follows it) and the fine-tuning rounds after it (t > num_rounds)."""
        return (self.schedule == "periodic" and server_round % self.every == 0
                and server_round < self.num_rounds)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if not self.periodic_event_due(server_round):
            return arrays, metrics
        if arrays is None:  # too few valid replies: the clients are unlikely to answer the queries either
            log(WARNING, "[pruning] round %d: aggregation skipped, so is this round's periodic pruning", server_round)
            return arrays, metrics
        t0 = time.perf_counter()
        state, info = self.prune_and_adjust(self._grid, arrays.to_torch_state_dict(), server_round)
        # the event's figures go into this round's metrics.jsonl row (`defense`), next to the round's MA/ASR
        self.last_report.info = {**self.last_report.info, **info, "t_prune": time.perf_counter() - t0}
        return ArrayRecord(state), metrics

    # ---- the phases ------------------------------------------------------------------------------
    def _query(self, grid: Grid, action: str, state: StateDict, config: dict[str, Any]) -> list[Message]:
        node_ids = sorted(grid.get_node_ids())
        messages = [Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)}),
                            dst_node_id=node, message_type=f"query.{action}") for node in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=self.query_timeout))
        good = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "query.%s: node %d failed: %s", action, reply.metadata.src_node_id, reply.error.reason)
            else:
                good.append(reply)
        # replies arrive in any order; sort by node id so the aggregates are reproducible
        return sorted(good, key=lambda m: m.metadata.src_node_id)

    def _phase(self, name: str, state: StateDict, server_round: int, rounds: int, seconds: float,
               **info: Any) -> None:
        self.post_train_phases.append({"phase": name, "round": server_round, "phase_rounds": rounds,
                                       "t_round": seconds, "state": {k: v.clone() for k, v in state.items()},
                                       **({"defense": info} if info else {})})

    def rank_channels(self, grid: Grid, state: StateDict, target: PruningTarget) -> torch.Tensor:
        """Phase 1a: the global pruning sequence from the clients' activations."""
        acts, counts = [], []
        for reply in self._query(grid, ACTIVATIONS_ACTION, state, {"samples": self.activation_samples}):
            try:
                a = reply.content[RESULT_KEY].to_torch_state_dict()["activations"]
                n = int(reply.content["metrics"]["num-examples"])
            except (KeyError, TypeError) as exc:
                log(WARNING, "query.%s: malformed reply ignored (%s)", ACTIVATIONS_ACTION, exc)
                continue
            if a.shape != (target.channels,) or n <= 0 or not torch.isfinite(a).all():
                log(WARNING, "query.%s: reply with %s activations / %d examples ignored", ACTIVATIONS_ACTION,
                    tuple(a.shape), n)
                continue
            acts.append(a)
            counts.append(n)
        if not acts:
            log(WARNING, "query.%s: no valid reply; channels kept in index order", ACTIVATIONS_ACTION)
            return torch.arange(target.channels)
        return pruning_sequence(acts, counts, self.agg, self.vote_share)

    def choose_pruning_rate(self, grid: Grid, state: StateDict, order: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Phase 1b: (index of r* in the grid, aggregated accuracy per rate)."""
        config = {"order": [int(i) for i in order], "rates": self.rates, "samples": self.accuracy_samples}
        rows, counts = [], []
        for reply in self._query(grid, ACCURACY_ACTION, state, config):
            try:
                metrics = reply.content["metrics"]
                acc, n = [float(a) for a in metrics["accuracy"]], int(metrics["num-examples"])
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "query.%s: malformed reply ignored (%s)", ACCURACY_ACTION, exc)
                continue
            if len(acc) != len(self.rates) or n <= 0 or not all(0.0 <= a <= 1.0 for a in acc):
                log(WARNING, "query.%s: reply with %d accuracies ignored", ACCURACY_ACTION, len(acc))
                continue
            rows.append(acc)
            counts.append(n)
        if not rows:
            log(WARNING, "query.%s: no valid reply; nothing pruned", ACCURACY_ACTION)
            return 0, torch.full((len(self.rates),), float("nan"))
        curve = aggregate_accuracies(torch.tensor(rows), counts, self.accuracy_agg)
        return choose_rate(self.rates, curve, self.tolerance), curve

    def finetune(self, grid: Grid, state: StateDict, target: PruningTarget, first_round: int) -> StateDict:
        """Phase 2: ordinary train rounds with the mask held on the clients and re-applied here."""
        for server_round in range(first_round, first_round + self.finetune_rounds):
            messages = self.configure_train(server_round, ArrayRecord(state), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=self.query_timeout)
            arrays, _ = self.aggregate_train(server_round, replies)
            if arrays is not None:
                state = apply_mask(arrays.to_torch_state_dict(), target, self.keep)
            log(INFO, "[pruning] fine-tuning round %d/%d%s", server_round - first_round + 1, self.finetune_rounds,
                "" if arrays is not None else " SKIPPED")
        return state

    def prune(self, grid: Grid, state: StateDict, target: PruningTarget) -> tuple[StateDict, dict[str, Any]]:
        """Phases 1a and 1b on `state`: sets the mask `self.keep`; returns the pruned state and its figures.

        A mask held from an earlier periodic event stays: its channels (all zero, so dormant anyway) go first
        in the sequence, so a rate counts every removed channel, and they are removed whatever r* is."""
        held = self.keep
        order = self.rank_channels(grid, state, target)
        if held is not None:
            order = torch.cat([order[~held[order]], order[held[order]]])
        index, curve = self.choose_pruning_rate(grid, state, order)
        rate = self.rates[index]
        self.keep = keep_mask(order, target.channels, rate)
        if held is not None:
            self.keep &= held
        n_pruned = int((~self.keep).sum())
        n_held = 0 if held is None else int((~held).sum())
        log(INFO, "[pruning] layer %s: rate %.2f removes %d of %d channels (%d newly; client accuracy %.4f -> %.4f)",
            target.layer, rate, n_pruned, target.channels, n_pruned - n_held, float(curve[0]), float(curve[index]))
        return apply_mask(state, target, self.keep), {
            "layer": target.layer, "rate": rate, "n_pruned": n_pruned, "n_newly_pruned": n_pruned - n_held,
            "client_acc_unpruned": float(curve[0]), "client_acc_pruned": float(curve[index]),
            "client_acc_curve": [float(a) for a in curve], "sequence": [int(c) for c in order]}

    def adjust(self, state: StateDict, target: PruningTarget) -> tuple[StateDict, dict[str, Any]]:
        """Phase 3: the extreme weights of the layer's kept filters set to 0; returns the state and its figures."""
        state, n_adjusted = adjust_extreme_weights(state, target, self.delta, self.adjust_stats == "filter", self.keep)
        weights = state[f"{target.layer}.weight"].numel()
        log(INFO, "[pruning] extreme weights (δ = %g): %d of %d set to 0", self.delta, n_adjusted, weights)
        return state, {"n_adjusted": n_adjusted, "share_adjusted": n_adjusted / weights}

    def prune_and_adjust(self, grid: Grid, state: StateDict, server_round: int) -> tuple[StateDict, dict[str, Any]]:
        """A periodic event after round `server_round`: 1a, 1b and 3, no fine-tuning (training goes on with
        the mask held). Returns the new global state and the figures for the round's row."""
        log(INFO, "[pruning] periodic pruning after round %d (every %d rounds)", server_round, self.every)
        target = find_pruning_target(state)
        state, pruned = self.prune(grid, state, target)
        state, adjusted = self.adjust(state, target)
        return state, {"pruning_event": "periodic", **pruned, **adjusted}

    def post_train(self, grid: Grid, global_state: StateDict, server_round: int) -> StateDict:
        self.post_train_phases = []
        self._phase("train", global_state, server_round, server_round, 0.0)
        target = find_pruning_target(global_state)

        t0 = time.perf_counter()
        state, pruned = self.prune(grid, global_state, target)
        self._phase("prune", state, server_round, 2, time.perf_counter() - t0, **pruned)

        t0 = time.perf_counter()
        state = self.finetune(grid, state, target, server_round + 1)
        last_round = server_round + self.finetune_rounds
        self._phase("finetune", state, last_round, self.finetune_rounds, time.perf_counter() - t0)

        t0 = time.perf_counter()
        state, adjusted = self.adjust(state, target)
        self._phase("adjust", state, last_round, 0, time.perf_counter() - t0, **adjusted)
        self.keep = None
        return state
