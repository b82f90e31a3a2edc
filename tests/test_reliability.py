"""Reliability: malformed replies never reach a defense (a hypothesis fuzz through every strategy of
conf/strategy), and the reply validation's individual rules. The end-to-end guarantees (failing
clients, SIGKILL + resume, determinism) run through `flwr run` in tests/test_reliability_runs.py."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_messages import reply_to, train_message
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from server.app import build_strategy
from strategies.base import ReplyLimits, ServerContext, update_from_message
from strategies.sdfc import FLOC_RECORD
from task.config import CONF_DIR, compose_config
from task.data import InputSpec
from task.train import LocalTrainingConfig

STRATEGIES = sorted(p.stem for p in (Path(CONF_DIR) / "strategy").glob("*.yaml"))
VALID_CLIENTS = 10
EXAMPLES_PER_STRATEGY = math.ceil(1000 / len(STRATEGIES)) + 5  # >= 1000 malformed rounds in all
MALFORMED_SEEN: Counter = Counter()


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def tiny_server_context() -> ServerContext:
    rng = np.random.default_rng(0)
    return ServerContext(x_val=rng.integers(0, 255, (48, 2, 2, 1), dtype=np.uint8), y_val=rng.integers(0, 3, 48),
                         spec=InputSpec(mean=(0.5,), std=(0.5,), image_size=2, channels=1),
                         build_model=tiny_model, device=torch.device("cpu"),
                         local=LocalTrainingConfig(epochs=1, lr=0.05, batch_size=16))


def build(name: str):
    cfg = compose_config(f"strategy={name} num_clients={VALID_CLIENTS + 3} min_train_clients=2")
    strategy = build_strategy(cfg)
    model = tiny_model()
    strategy.trainable_keys = [n for n, _ in model.named_parameters()]
    if strategy.needs_server_data:
        strategy.server_context = tiny_server_context()
    strategy.check_preconditions(VALID_CLIENTS)
    torch.manual_seed(0)
    return strategy, {k: v.detach().clone() for k, v in tiny_model().state_dict().items()}


def valid_reply(strategy, node: int, global_state: dict, seed: int) -> Message:
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in global_state.items()}
    reply = reply_to(train_message(node, global_state), state, 20 + node % 7)
    if strategy.client_half is not None and type(strategy).__name__ == "FisherCalibrationStrategy":
        reply.content[FLOC_RECORD] = ArrayRecord({k: torch.rand(v.shape, generator=g) * 1e-3
                                                  for k, v in state.items()})
    return reply


KINDS = ["no-arrays", "no-metrics", "bad-count", "missing-key", "extra-key", "shape", "dtype", "nan", "inf",
         "huge-norm", "oversized", "duplicate", "error"]


@st.composite
def malformations(draw):
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3))
    return [(kind, draw(st.integers(0, 3)), draw(st.integers(0, 10_000)),
             draw(st.sampled_from([0, -1, -1e9, float("nan"), float("inf")]))) for kind in kinds]


def corrupt(strategy, node: int, global_state: dict, kind: str, key_index: int, position: int, count) -> Message:
    base = valid_reply(strategy, node, global_state, seed=node)
    content = base.content
    keys = list(global_state)
    key = keys[key_index % len(keys)]
    state = content["arrays"].to_torch_state_dict()
    if kind == "no-arrays":
        del content["arrays"]
    elif kind == "no-metrics":
        del content["metrics"]
    elif kind == "bad-count":
        metrics = dict(content["metrics"])
        metrics["num-examples"] = count
        content["metrics"] = MetricRecord(metrics)
    elif kind == "missing-key":
        content["arrays"] = ArrayRecord({k: v for k, v in state.items() if k != key})
    elif kind == "extra-key":
        content["arrays"] = ArrayRecord({**state, "intruder.weight": torch.zeros(2)})
    elif kind == "shape":
        state[key] = torch.zeros(*state[key].shape, 2)
        content["arrays"] = ArrayRecord(state)
    elif kind == "dtype":
        state[key] = state[key].to(torch.float64)
        content["arrays"] = ArrayRecord(state)
    elif kind in ("nan", "inf"):
        flat = state[key].flatten().clone()
        flat[position % flat.numel()] = float("nan") if kind == "nan" else float("-inf")
        state[key] = flat.view(state[key].shape)
        content["arrays"] = ArrayRecord(state)
    elif kind == "huge-norm":
        state[key] = state[key] * 1e9 + 1e6
        content["arrays"] = ArrayRecord(state)
    elif kind == "oversized":
        content["blob"] = ArrayRecord([np.zeros(1 << 21, dtype=np.float32)])  # 8 MiB of extras
    elif kind == "error":
        return Message(error=Error(code=0, reason="client crashed"), reply_to=train_message(node, global_state))
    return base


def run_fuzz_round(strategy, global_state: dict, plan) -> None:
    strategy.global_state = global_state
    valid = [valid_reply(strategy, 100 + i, global_state, seed=i) for i in range(VALID_CLIENTS)]
    bad, duplicates, errors = [], 0, 0
    for j, (kind, key_index, position, count) in enumerate(plan):
        if kind == "duplicate":  # a second, different reply from a node that already replied
            duplicates += 1
            bad.append(valid_reply(strategy, 100 + j, global_state, seed=1000 + j))
            continue
        node = 500 + j
        errors += kind == "error"
        bad.append(corrupt(strategy, node, global_state, kind, key_index, position, count))
    arrays, _ = strategy.aggregate_train(1, [*valid, *bad])  # no exception may escape
    report = strategy.last_report
    bad_nodes = {500 + j for j, (kind, *_rest) in enumerate(plan) if kind not in ("duplicate", "error")}
    assert set(report.invalid) == bad_nodes | ({100 + j for j, p in enumerate(plan) if p[0] == "duplicate"}
                                               if duplicates else set())
    assert all(reason.strip() for reason in report.invalid.values())
    assert report.failures == errors
    # every valid reply is still aggregated (a duplicate's FIRST reply is the valid one)
    assert set(report.node_ids) == {100 + i for i in range(VALID_CLIENTS)}
    assert arrays is not None and not report.skipped
    for value in arrays.to_torch_state_dict().values():
        assert torch.isfinite(value).all()
    MALFORMED_SEEN[type(strategy).__name__] += len(plan)


@pytest.mark.parametrize("name", STRATEGIES)
def test_malformed_replies_are_rejected_and_valid_ones_aggregated(name, flower_task_identity):
    strategy, global_state = build(name)

    @settings(max_examples=EXAMPLES_PER_STRATEGY, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(plan=malformations())
    def fuzz(plan):
        run_fuzz_round(strategy, global_state, plan)

    fuzz()
    assert MALFORMED_SEEN[type(strategy).__name__] >= EXAMPLES_PER_STRATEGY


def test_fuzz_covers_at_least_a_thousand_malformed_replies():
    assert len(STRATEGIES) * EXAMPLES_PER_STRATEGY >= 1000  # and each example carries 1-3 malformed replies


# ---- the validation rules one by one --------------------------------------------------------------
def message_with(state: dict, num_examples=10, extras: dict | None = None) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": num_examples})})
    for k, v in (extras or {}).items():
        content[k] = v
    return Message(content, reply_to=train_message(7, state))


@pytest.mark.parametrize("mutate, kind, words", [
    (lambda s: {**s, "w": s["w"].double()}, "dtype", "dtype torch.float64"),
    (lambda s: {**s, "w": torch.zeros(3, 3)}, "shape", "shape (3, 3)"),
    (lambda s: {"b": s["b"]}, "keys", "lacks 1 key"),
    (lambda s: {**s, "w": torch.full((2, 2), float("nan"))}, "non-finite", "NaN or Inf"),
    (lambda s: {**s, "w": torch.full((2, 2), 1e5)}, "norm", "exceeds server.max_update_norm=10000"),
])
def test_each_rule_names_its_reason(mutate, kind, words, flower_task_identity):
    from strategies.base import InvalidReply

    g = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(InvalidReply) as info:
        update_from_message(message_with(mutate(g)), g)
    assert info.value.kind == kind and words in str(info.value)


def test_norm_bound_and_extra_size_are_configurable(flower_task_identity):
    g = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    far = {**g, "w": torch.full((2, 2), 1e5)}
    assert update_from_message(message_with(far), g, ReplyLimits(max_update_norm=None)).num_examples == 10
    extras = {"blob": ArrayRecord([np.zeros(64, dtype=np.float32)])}
    update_from_message(message_with(g, extras=extras), g)  # 256 bytes: under the default 4x model + 1 MiB
    from strategies.base import InvalidReply

    with pytest.raises(InvalidReply, match="exceed the limit of 100 bytes"):
        update_from_message(message_with(g, extras=extras), g, ReplyLimits(max_extra_bytes=100))


def test_validation_counts_reasons_per_round(flower_task_identity):
    strategy, global_state = build("fedavg")
    strategy.global_state = global_state
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in global_state.items()}
    replies = [valid_reply(strategy, 100 + i, global_state, seed=i) for i in range(3)]
    replies += [reply_to(train_message(200 + i, global_state), nan_state, 10) for i in range(2)]
    replies.append(reply_to(train_message(300, global_state), global_state, 0))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.last_report.invalid_kinds == {"non-finite": 2, "num-examples": 1}

