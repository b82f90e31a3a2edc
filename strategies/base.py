"""The strategy base layer every thorn defense plugs into.

A thorn strategy is a Flower Message-API strategy (a `flwr.serverapp.strategy.FedAvg` subclass), but
a defense author never touches Messages: `aggregate_train` turns the replies into `ClientUpdate`s
and calls the one method the defense category asks for.

Defense categories (as in DESIGN.md):
- `RobustAggregation`: replaces the mean (`aggregate_updates`).
- `AnomalyDetection`: returns the node ids it rejects (`detect`); the rest are averaged, and the run
  recorder gets detection TP/FP/TN/FN for free from the round report.
- `Reweighting`: returns one weight per client (`client_weights`); the recorder reports the weight
  mass on malicious clients.
- `ClientSideDefense`: adds per-client instructions and records to the train message
  (`client_instructions`, `client_records`); its client half (a `ClientHalf` subclass, named by the
  strategy's `client_half` attribute) lives in the same module and runs inside the ClientApp.
- `PostTrainingDefense`: transforms the global model after the last round (`post_train`).

Ground truth: a reply's `truth` record (is the client malicious?) is removed by the ServerApp's grid
wrapper before any reply reaches a strategy (`server/truth.py`), so defense code cannot read it.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from strategies.aggregation import (
    COLUMN_BLOCK,
    StateDict,
    default_trainable_keys,
    flatten_states,
    gram_matrix,
    weighted_average_states,
    weighted_row_sum,
)
from strategies.stack import ReplyStack, StackColumns, array_view

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"


@dataclass
class ServerContext:
    """What the server itself holds, for defenses that need it (FLTrust's root data, SDFC's Fisher,
    FIP's purification): its clean split, a way to build the model, and the local training setup."""

    x_val: Any                       # uint8 NHWC images of the server's clean split
    y_val: Any                       # int64 labels
    spec: Any                        # task.data.InputSpec
    build_model: Any                 # () -> torch.nn.Module (fresh, untrained)
    device: torch.device
    local: Any                       # task.train.LocalTrainingConfig
    seed: int = 0


@dataclass
class ClientUpdate:
    """One client's reply as a defense sees it: no Message, no ground truth."""

    node_id: int
    state: StateDict                 # the uploaded model (full state dict)
    num_examples: int
    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)  # further records (e.g. Fisher vectors)
    # set when the float32 state tensors are row `row` of the round's ReplyStack (read-only; strategies/stack.py)
    stack: ReplyStack | None = field(default=None, repr=False)
    row: int | None = None


@dataclass
class AggregationOutcome:
    state: StateDict | None                      # None: keep the global model
    weights: dict[int, float]                    # node id -> weight in the aggregate (sums to 1 over kept)
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    info: dict[str, float] = field(default_factory=dict)    # defense-specific scalars for the records
    client_info: dict[int, dict[str, float]] = field(default_factory=dict)  # node id -> per-client scalars


@dataclass
class RoundReport:
    """What happened in one aggregation; the run recorder joins it with the truth it holds."""

    server_round: int
    node_ids: list[int]                          # nodes whose replies were aggregated or examined
    weights: dict[int, float]
    rejected: dict[int, str]
    failures: int                                # replies that came back as errors (or never came)
    invalid: dict[int, str]                      # replies rejected by validation, with the reason
    train_loss: float | None
    t_aggregate: float
    skipped: bool
    client_seconds: list[float] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)
    client_info: dict[int, dict[str, float]] = field(default_factory=dict)
    invalid_kinds: dict[str, int] = field(default_factory=dict)  # rejection category -> count
    filtering: bool = True  # does the strategy reject clients (detection TPR/FPR make sense)?


class InvalidReply(ValueError):
    """A reply that cannot be aggregated; the message is the reason recorded for it, `kind` the short
    category counted in metrics.jsonl (`invalid_reasons`)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ReplyLimits:
    """Bounds a reply must respect before any defense sees it (strategy base layer, `server.*` config)."""

    max_update_norm: float | None = 1.0e4    # L2 norm of (uploaded - global) over the trainable parameters
    max_extra_bytes: int | None = None       # extra records in total; None: 4x the model's size + 1 MiB


def content_key(update: ClientUpdate) -> tuple[int, int]:
    """A key that depends only on what a client sent: (example count, CRC of the first and last
    floating tensors). Node ids are random per run and replies arrive in any order, while
    floating-point sums depend on order; sorting by this key makes aggregation reproducible."""
    tensors = [v for v in update.state.values() if torch.is_floating_point(v)] or list(update.state.values())
    crc = 0
    for t in (tensors[0], tensors[-1]):
        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
    return update.num_examples, crc


def record_bytes(record: Any) -> int:
    if isinstance(record, ArrayRecord):
        return sum(len(array.data) for array in record.values())
    return sum(len(str(k)) + len(v) if isinstance(v, bytes | str) else len(str(k)) + 8 for k, v in record.items())


def decode_arrays(record: ArrayRecord, global_state: StateDict | None, views: Collection[str] = ()) -> StateDict:
    """The reply's arrays as tensors, checked against the global model's keys, shapes and dtypes.

    Entries named in `views` that are C-contiguous float32 become READ-ONLY tensors over the serialised bytes
    themselves (no copy: see strategies/stack.py); every other entry becomes a writable tensor of its own."""
    try:
        keys = list(record.keys())
    except Exception as exc:  # a reply cannot crash the server
        raise InvalidReply(f"the uploaded arrays cannot be read: {exc}", "undecodable") from None
    if global_state is not None:
        present = set(keys)
        missing = [k for k in global_state if k not in present]
        extra = [k for k in keys if k not in global_state]
        if missing:
            raise InvalidReply(f"the uploaded model lacks {len(missing)} key(s), e.g. {missing[0]!r}", "keys")
        if extra:
            raise InvalidReply(f"the uploaded model has {len(extra)} unknown key(s), e.g. {extra[0]!r}", "keys")
        keys = list(global_state)  # the global model's key order
    state: StateDict = {}
    with warnings.catch_warnings():  # torch warns that it cannot mark a tensor over bytes read-only
        warnings.simplefilter("ignore", UserWarning)
        for k in keys:
            state[k] = _decode_entry(record, k, global_state, k in views)
    return state


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """torch's dtype for a NumPy dtype; raises for types torch lacks."""
    if dtype not in _TORCH_DTYPES:
        _TORCH_DTYPES[dtype] = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return _TORCH_DTYPES[dtype]


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def _decode_entry(record: ArrayRecord, k: str, global_state: StateDict | None, view: bool) -> torch.Tensor:
    try:
        array = record[k]
        values = array_view(array.data) if array.stype == "numpy.ndarray" else array.numpy()
        dtype = _torch_dtype(values.dtype)
    except Exception as exc:
        raise InvalidReply(f"the uploaded arrays cannot be read: {exc}", "undecodable") from None
    if global_state is not None:
        ref = global_state[k]
        if tuple(values.shape) != tuple(ref.shape):
            raise InvalidReply(f"{k!r} has shape {tuple(values.shape)}, expected {tuple(ref.shape)}", "shape")
        if dtype != ref.dtype:
            raise InvalidReply(f"{k!r} has dtype {dtype}, expected {ref.dtype}", "dtype")
    if view and values.dtype == np.float32 and values.flags.c_contiguous:
        return torch.from_numpy(values)  # read-only in fact: the reply's bytes
    return torch.from_numpy(np.array(values))  # a writable copy of its own


NORM_CHUNK = 1 << 20  # entries per float32 difference in squared_update_norm


def squared_update_norm(state: StateDict, global_state: StateDict, keys: list[str]) -> float:
    """|state - global|² over `keys`: float64 sums of float32 differences taken chunk by chunk in one
    buffer (a float64 copy of a 44 MB model per reply, or a fresh difference, costs more than the sum). A
    NaN/Inf among the entries makes the result non-finite."""
    largest = max((global_state[k].numel() for k in keys), default=0)
    scratch = torch.empty(min(largest, NORM_CHUNK), dtype=torch.float32)
    total = 0.0
    for k in keys:
        mine, ref = state[k].reshape(-1), global_state[k].reshape(-1)
        if mine.dtype != torch.float32:
            total += float((mine.double() - ref.double()).pow(2).sum())
            continue
        for start in range(0, mine.numel(), NORM_CHUNK):
            end = min(start + NORM_CHUNK, mine.numel())
            diff = torch.sub(mine[start:end], ref[start:end], out=scratch[:end - start])
            total += float(torch.dot(diff, diff).double())
    return total


def check_update_norm(squared: float, state: StateDict, keys: list[str], limits: ReplyLimits) -> None:
    """InvalidReply when |update|² over the trainable `keys` is not finite (naming an entry holding NaN/Inf)
    or its root exceeds `limits.max_update_norm`."""
    if not math.isfinite(squared):
        bad = next((k for k in keys if not torch.isfinite(state[k]).all()), None)
        if bad is not None:
            raise InvalidReply(f"{bad!r} holds NaN or Inf", "non-finite")
    norm = math.sqrt(squared) if squared >= 0 else math.nan
    if limits.max_update_norm is not None and (not math.isfinite(norm) or norm > limits.max_update_norm):
        raise InvalidReply(f"update norm {norm:.4g} exceeds server.max_update_norm={limits.max_update_norm:g}", "norm")


def update_from_message(msg: Message, global_state: StateDict | None, limits: ReplyLimits | None = None,
                        norm_keys: list[str] | None = None, views: Collection[str] = (),
                        deferred: bool = False) -> ClientUpdate:
    """Turn a reply into a ClientUpdate, rejecting (InvalidReply) what cannot be aggregated: missing
    records, a bad example count, other keys, shapes or dtypes than the global model's, NaN/Inf, an
    absurd update norm (over `norm_keys`, the trainable parameters), oversized extra records.

    Entries named in `views` are read-only views of the reply's bytes (`decode_arrays`). With `deferred`,
    the NaN/Inf and norm checks of the `norm_keys` entries are left to the caller, which runs them for the
    whole round in one pass (`ThornStrategy.aggregate_train`, `check_update_norm`)."""
    limits = limits or ReplyLimits()
    content = msg.content
    if ARRAYS_KEY not in content.array_records:
        raise InvalidReply("no 'arrays' ArrayRecord in the reply", "missing-arrays")
    if METRICS_KEY not in content.metric_records:
        raise InvalidReply("no 'metrics' MetricRecord in the reply", "missing-metrics")
    metrics = dict(content.metric_records[METRICS_KEY])
    num_examples = metrics.get(NUM_EXAMPLES_KEY)
    if (not isinstance(num_examples, int | float) or isinstance(num_examples, bool)
            or not math.isfinite(num_examples) or num_examples <= 0):
        raise InvalidReply(f"'num-examples' must be a positive number, got {num_examples!r}", "num-examples")
    state = decode_arrays(content.array_records[ARRAYS_KEY], global_state, views)
    # over the trainable parameters: BatchNorm running statistics may legitimately be large
    keys = None
    if global_state is not None:
        keys = norm_keys if norm_keys is not None else default_trainable_keys(global_state)
    squared, finite_checked = None, set(keys) if deferred and keys is not None else set()
    if keys is not None and not deferred and limits.max_update_norm is not None:
        squared = squared_update_norm(state, global_state, keys)
        if math.isfinite(squared):  # a NaN/Inf among these entries would have made the sum non-finite
            finite_checked = set(keys)
    for k, v in state.items():
        if k not in finite_checked and torch.is_floating_point(v) and not torch.isfinite(v).all():
            raise InvalidReply(f"{k!r} holds NaN or Inf", "non-finite")
    if squared is not None and any(torch.is_floating_point(v) for v in state.values()):
        check_update_norm(squared, state, keys, limits)
    extras = {k: v for k, v in content.items() if k not in (ARRAYS_KEY, METRICS_KEY)}
    if extras:
        bound = limits.max_extra_bytes
        if bound is None:
            bound = 4 * sum(v.numel() * v.element_size() for v in state.values()) + (1 << 20)
        size = sum(record_bytes(r) for r in extras.values())
        if size > bound:
            raise InvalidReply(f"extra records of {size} bytes exceed the limit of {bound} bytes", "oversized")
    update = ClientUpdate(node_id=msg.metadata.src_node_id, state=state, num_examples=int(num_examples),
                          metrics={k: float(v) for k, v in metrics.items()
                                   if isinstance(v, int | float) and not isinstance(v, bool)},
                          extras=extras)
    return update


class ClientHalf:
    """The client half of a defense, run by the ClientApp on every client of a round.

    Malicious clients run it too: thorn's threat model is poisoning clients that follow the protocol
    (what the seed defenses assume), not clients that forge the defense's own messages. One instance
    per message; `state` is the node's `context.state` (persists across rounds on that node); `client`
    is the Benign/MaliciousClient about to train (its model, data, partition id and config).
    """

    query_actions: tuple[str, ...] = ()  # `query.<action>` messages this half answers (client/app.py)

    def __init__(self, state: RecordDict, client: Any) -> None:
        self.state, self.client = state, client

    def before_training(self, content: RecordDict, server_round: int) -> None:
        """Read what the server sent (the train message's records) and prepare; the client's model
        already holds the global model."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to every training step's loss (None: none)."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """Edit the model after every optimizer step (e.g. re-apply a pruning mask)."""

    def after_training(self, model: nn.Module) -> dict[str, ArrayRecord | ConfigRecord | MetricRecord]:
        """Extra records for the train reply (e.g. a local Fisher); persist what the next round needs
        into `self.state`."""
        return {}

    def query(self, action: str, content: RecordDict) -> RecordDict:
        """Answer a `query.<action>` message from the server (e.g. activation statistics)."""
        raise NotImplementedError(f"{type(self).__name__} answers no query '{action}'")


class ThornStrategy(FedAvg):
    """Base of every thorn strategy. Subclasses implement `aggregate_updates` (or a category's hook)."""

    category = "robust_aggregation"
    needs_server_data = False  # True: the server hands it a ServerContext (needs server.val_fraction > 0)
    client_half: type[ClientHalf] | None = None  # the defense's client half, if it has one
    filtering = False  # True: it rejects clients, so the records score its detection (TPR/FPR)
    # True: the rule needs the Gram matrix of the models minus the global model (Krum's distances); the
    # round's validation pass computes it, rather than a second pass over 100 x 11 M floats (centred_gram)
    shares_gram = False
    # True: the rule averages (some of) the models by example count (base.example_mean); the validation pass
    # computes the example-weighted sum of all of them, so that mean costs no pass of its own
    shares_example_sum = False

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 **kwargs: Any) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, **kwargs)
        # thorn evaluates centrally (MA/ASR on the server); no federated evaluation round. Set after
        # __init__ because FedAvg logs a warning for every instance built with fraction_evaluate=0.
        self.fraction_evaluate, self.min_evaluate_nodes = 0.0, 0
        self.global_state: StateDict | None = None
        self.last_report: RoundReport | None = None
        # Set by the ServerApp before round 1: the model's trainable keys (distances, norms and
        # clustering use these only, never BatchNorm statistics) and, if needed, the server context.
        self.trainable_keys: list[str] | None = None
        self.server_context: ServerContext | None = None
        self.reply_limits = ReplyLimits()  # set from the `server.*` config by the ServerApp

    def keys_for_vectors(self, state: StateDict) -> list[str]:
        return self.trainable_keys if self.trainable_keys is not None else default_trainable_keys(state)

    def check_preconditions(self, clients_per_round: int) -> None:
        """Raise ValueError (one line naming the key) when the rule cannot work with this many clients
        per round, e.g. Krum needs n > 2f + 2. Called before round 1."""

    # ---- hooks for subclasses ------------------------------------------------------------------
    def aggregate_updates(self, server_round: int, global_state: StateDict,
                          updates: list[ClientUpdate]) -> AggregationOutcome:
        raise NotImplementedError

    def validate_update(self, update: ClientUpdate) -> None:
        """Raise InvalidReply when a reply cannot be used by this defense (e.g. a missing extra record);
        it is then rejected with that reason before aggregation, like a malformed model."""

    def client_instructions(self, server_round: int, node_id: int) -> dict[str, Any]:
        """Extra per-client config for the train message (ClientSideDefense overrides this)."""
        return {}

    def client_records(self, server_round: int, node_id: int) -> dict[str, ArrayRecord | ConfigRecord]:
        """Extra per-client records for the train message (e.g. SDFC's Fisher difference D_k)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Strategy state to checkpoint (histories, per-client vectors); empty for stateless rules."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    # ---- Flower Strategy API ---------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            # FedAvg gives every message the same RecordDict: give each its own before adding
            # per-client instructions, or one client's instructions would reach all of them.
            node = msg.metadata.dst_node_id
            cfg = ConfigRecord({**dict(msg.content[CONFIG_KEY]), **self.client_instructions(server_round, node)})
            records = self.client_records(server_round, node)
            if ARRAYS_KEY in records or CONFIG_KEY in records:
                raise ValueError(f"{type(self).__name__}.client_records must not replace '{ARRAYS_KEY}'/'{CONFIG_KEY}'")
            msg.content = RecordDict({ARRAYS_KEY: msg.content[ARRAYS_KEY], CONFIG_KEY: cfg, **records})
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        candidates, invalid, invalid_kinds, failures = [], {}, {}, 0
        seen: set[int] = set()
        norm_keys = self.keys_for_vectors(self.global_state) if self.global_state is not None else None
        # every accepted model becomes one row of the round's stack: views of its reply's bytes (stack.py)
        stack = ReplyStack(self.global_state, norm_keys) if self.global_state is not None and replies else None
        views = set(stack.keys) if stack is not None else set()
        # the NaN/norm check of the trainable parameters runs once for the whole round over the stack's
        # rows, where it can share its pass over the models with the strategy's Gram matrix
        width = stack.vectors_for(norm_keys) if stack is not None else None

        def reject(node: int, exc: InvalidReply) -> None:
            invalid[node] = str(exc)
            invalid_kinds[exc.kind] = invalid_kinds.get(exc.kind, 0) + 1
            log(WARNING, "round %d: reply of node %d rejected: %s", server_round, node, exc)

        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures += 1
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            try:
                if node in seen:
                    raise InvalidReply(f"a second reply from node {node} in this round", "duplicate")
                seen.add(node)
                update = update_from_message(msg, self.global_state, self.reply_limits, norm_keys, views,
                                             deferred=width is not None)
                self.validate_update(update)
                candidates.append(update)
            except InvalidReply as exc:
                reject(node, exc)

        candidates.sort(key=content_key)
        updates = candidates
        if stack is not None:  # rows in the sorted order (appending copies nothing)
            for update in candidates:
                update.stack, update.row = stack, stack.append(update.state)
        if width is not None and candidates:
            updates = []
            for update, squared in zip(candidates, self._squared_update_norms(stack, candidates, width), strict=True):
                try:
                    check_update_norm(squared, update.state, norm_keys, self.reply_limits)
                    updates.append(update)
                except InvalidReply as exc:
                    reject(update.node_id, exc)
        train_loss = None
        if updates:
            total = sum(u.num_examples for u in updates)
            losses = [(u.metrics.get("train-loss"), u.num_examples) for u in updates]
            if all(loss is not None for loss, _ in losses):
                train_loss = sum(loss * n for loss, n in losses) / total
        client_seconds = [u.metrics["train-seconds"] for u in updates if "train-seconds" in u.metrics]

        skipped = len(updates) < max(self.min_train_nodes, 1)
        outcome = AggregationOutcome(state=None, weights={})
        t0 = time.perf_counter()
        if skipped:
            log(WARNING, "round %d: %d valid replies, fewer than the minimum %d: global model unchanged",
                server_round, len(updates), self.min_train_nodes)
        else:
            outcome = self.aggregate_updates(server_round, self.global_state, updates)
        t_aggregate = time.perf_counter() - t0

        self.last_report = RoundReport(
            server_round=server_round, node_ids=[u.node_id for u in updates], weights=outcome.weights,
            rejected=outcome.rejected, failures=failures, invalid=invalid, train_loss=train_loss,
            t_aggregate=t_aggregate, skipped=skipped or outcome.state is None, client_seconds=client_seconds,
            info=outcome.info, client_info=outcome.client_info, invalid_kinds=invalid_kinds,
            filtering=self.filtering)
        if outcome.state is None:
            return None, None
        metrics = MetricRecord({"num-clients": len(updates), "num-rejected": len(outcome.rejected)})
        if train_loss is not None:
            metrics["train-loss"] = float(train_loss)
        return ArrayRecord(outcome.state), metrics

    def _squared_update_norms(self, stack: ReplyStack, updates: list[ClientUpdate], width: int) -> list[float]:
        """|model - global|² over the first `width` columns of every row of the stack (the updates, in row
        order). The same pass over the models leaves on the stack the rows' Gram matrix for a strategy that
        needs it (`shares_gram`) and their example-weighted sum for one that averages by example count
        (`shares_example_sum`)."""
        weights = [float(u.num_examples) for u in updates] if self.shares_example_sum else None
        return stack.summarise(width, weights, gram=self.shares_gram)

    def summary(self) -> None:
        log(INFO, "\t├──> thorn strategy %s (category: %s)", type(self).__name__, self.category)
        super().summary()


def example_weights(updates: list[ClientUpdate]) -> torch.Tensor:
    return torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)


def shared_stack(updates: list[ClientUpdate]) -> ReplyStack | None:
    """The ReplyStack holding every one of `updates`, or None (updates built by hand, as in unit tests)."""
    stack = updates[0].stack if updates else None
    if stack is None or any(u.stack is not stack for u in updates):
        return None
    return stack


def update_vectors(updates: list[ClientUpdate], keys: list[str],
                   reference: StateDict) -> tuple[torch.Tensor | StackColumns, torch.Tensor]:
    """(matrix, reference vector): row i of the matrix is updates[i]'s model over `keys`, the vector is the
    reference model's (usually the global one).

    READ-ONLY. When the updates are rows of the round's ReplyStack, `matrix` is a `StackColumns` over the
    replies' own bytes (no copy of 100 x 11 M floats), read through `aggregation.row_block` and the column-block
    helpers. Otherwise it is a fresh float32 flattening."""
    stack = shared_stack(updates)
    width = stack.vectors_for(keys) if stack is not None else None
    if width is None:
        return flatten_states([u.state for u in updates], keys), flatten_states([reference], keys)[0]
    # the stack holds the global model it was built from in the same layout: no flattening needed
    reference_vector = stack.reference[:width] if reference is stack.template else flatten_states([reference], keys)[0]
    return stack.columns([u.row for u in updates], width), reference_vector


def centred_gram(updates: list[ClientUpdate], keys: list[str], reference: StateDict) -> torch.Tensor:
    """(n, n) float64 Gram matrix of the updates' vectors over `keys` minus the reference's (the global
    model): from the round's validation pass when it computed one (`ThornStrategy.shares_gram`), else now.
    Entries touched by a rejected row (NaN, say) are never used: only the updates' rows are taken, and a
    non-finite entry among them falls back to computing afresh."""
    stack = shared_stack(updates)
    if (stack is not None and stack.gram is not None and reference is stack.template
            and stack.vectors_for(keys) == stack.gram_width):
        index = torch.as_tensor([u.row for u in updates], dtype=torch.long)
        gram = stack.gram[index][:, index]
        if bool(torch.isfinite(gram).all()):
            return gram
    vectors, reference_vector = update_vectors(updates, keys, reference)
    return gram_matrix(vectors, offset=reference_vector)


def mean_of(updates: list[ClientUpdate], weights: torch.Tensor) -> AggregationOutcome:
    """Weighted mean of the updates' state dicts; `weights` need not be normalised."""
    w = (weights / weights.sum()).to(torch.float64)
    stack = shared_stack(updates)
    if len(updates) == 1:
        state = {k: v.clone() for k, v in updates[0].state.items()}
    elif stack is None:
        state = weighted_average_states([u.state for u in updates], w)
    else:  # float64 accumulation over column blocks of the stack, as weighted_average_states does
        total = weighted_row_sum(stack.columns([u.row for u in updates]), w)
        state = stacked_state(stack, updates, total, w)
    return AggregationOutcome(state=state,
                              weights={u.node_id: float(wi) for u, wi in zip(updates, w, strict=True)})


def stacked_state(stack: ReplyStack, updates: list[ClientUpdate], vector: torch.Tensor,
                  weights: torch.Tensor) -> StateDict:
    """A full state dict from a (width,) vector over the stack's columns; the entries outside the stack
    (integer buffers, other dtypes) are the `weights`-mean of the updates' (integer buffers: the max)."""
    state = stack.unflatten(vector)
    others = [k for k in updates[0].state if not stack.holds(k)]
    if others:
        state.update(weighted_average_states([{k: u.state[k] for k in others} for u in updates], weights))
    return {k: state[k] for k in updates[0].state}


def example_mean(updates: list[ClientUpdate]) -> AggregationOutcome:
    """mean_of(updates, example_weights(updates)). When the round's validation pass left the example-
    weighted sum of every row on the stack (`ThornStrategy.shares_example_sum`), the sum over the kept rows
    is that sum minus the rows left out (none for FedAvg, f for Multi-Krum): no pass over the kept models.
    Falls back to mean_of when more rows were left out than kept, or when a left-out row held NaN/Inf."""
    weights = example_weights(updates)
    stack = shared_stack(updates)
    if stack is None or stack.weighted_sum is None or len(updates) == 1:
        return mean_of(updates, weights)
    kept = {u.row for u in updates}
    left_out = [r for r in range(stack.used) if r not in kept]
    if len(left_out) > len(updates):
        return mean_of(updates, weights)
    # reference + (weighted sum - left-out rows) / kept examples, block by block: the left-out rows are
    # gathered minus the reference (small numbers, float32 products), the sums stay float64
    left_weights = torch.tensor([stack.sum_weights[r] for r in left_out], dtype=torch.float32)
    examples = float(weights.sum())
    vector = torch.empty(stack.width, dtype=torch.float32)
    for start in range(0, stack.width, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, stack.width)
        kept_sum = stack.weighted_sum[start:end]
        if left_out:
            kept_sum = kept_sum - (left_weights @ stack.gather(left_out, start, end, stack.reference)).to(torch.float64)
        vector[start:end] = kept_sum / examples + stack.reference[start:end]
    if not math.isfinite(float(vector.sum())):  # a left-out row held NaN/Inf: it cannot be subtracted
        return mean_of(updates, weights)
    w = weights / weights.sum()
    state = stacked_state(stack, updates, vector, w)
    return AggregationOutcome(state=state, weights={u.node_id: float(wi) for u, wi in zip(updates, w, strict=True)})


class RobustAggregation(ThornStrategy):
    """Replaces the weighted mean by a robust rule (`aggregate_updates`)."""

    category = "robust_aggregation"


class AnomalyDetection(ThornStrategy):
    """Rejects suspected clients (`detect`), then averages the rest by example count."""

    category = "anomaly_detection"
    filtering = True
    shares_example_sum = True  # the kept updates are averaged by example count (example_mean)

    def detect(self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]) -> dict[int, str]:
        """Node id -> reason, for every update to reject."""
        raise NotImplementedError

    def aggregate_updates(self, server_round, global_state, updates):
        rejected = self.detect(server_round, global_state, updates)
        kept = [u for u in updates if u.node_id not in rejected]
        if not kept:
            log(WARNING, "round %d: every update was rejected: global model unchanged", server_round)
            return AggregationOutcome(state=None, weights={}, rejected=rejected)
        outcome = example_mean(kept)
        outcome.rejected = rejected
        outcome.weights.update({node: 0.0 for node in rejected})
        return outcome


class Reweighting(ThornStrategy):
    """Averages every update with defense-chosen weights (`client_weights`)."""

    category = "reweighting"

    def client_weights(self, server_round: int, global_state: StateDict, updates: list[ClientUpdate]) -> torch.Tensor:
        raise NotImplementedError

    def aggregate_updates(self, server_round, global_state, updates):
        return mean_of(updates, self.client_weights(server_round, global_state, updates).to(torch.float64))


class ClientSideDefense(ThornStrategy):
    """A defense with a client half: per-client instructions out, extra records back."""

    category = "client_side"


class PostTrainingDefense(ThornStrategy):
    """Cleans the global model after the last round (`post_train`), e.g. pruning or purification.

    A multi-phase defense fills `post_train_phases` during `post_train`, one dict per phase with
    `phase` (name), `round`, `phase_rounds`, `t_round`, `state` (the model after the phase) and optional
    `defense` (scalars); the ServerApp evaluates each state and writes one `metrics.jsonl` row per phase.
    Left empty, the server writes one `post_train` row for the returned model."""

    category = "post_training"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.post_train_phases: list[dict[str, Any]] = []

    def post_train(self, grid: Grid, global_state: StateDict, server_round: int) -> StateDict:
        raise NotImplementedError
