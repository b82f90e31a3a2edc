"""Flower Message helpers shared by the strategy tests (a plain module: `from flower_messages import ...`).

Building a Message outside a running app needs the `flower_task_identity` fixture (tests/conftest.py).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict


def train_message(node: int, global_state: dict) -> Message:
    """A train message to `node`, with the message id that pushing it would assign (as InMemoryGrid)."""
    msg = Message(RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({})}),
                  dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"id-{node}"
    return msg


def reply_to(msg: Message, state: dict, num_examples, loss: float = 0.5, truth: bool | None = None) -> Message:
    """A client's reply: its model, `num-examples`, `train-loss` and optionally a truth record."""
    content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss})})
    if truth is not None:
        content["truth"] = ConfigRecord({"is-malicious": truth})
    return Message(content, reply_to=msg)


def replies_for(states: list[dict], examples: list[int], global_state: dict) -> list[Message]:
    """Fresh replies from nodes 100, 101, ... (Flower's strategies consume the arrays they aggregate)."""
    return [reply_to(train_message(100 + i, global_state), s, n)
            for i, (s, n) in enumerate(zip(states, examples, strict=True))]


def run_round(strategy, spec: list[tuple[int, dict, int]], global_state: dict, server_round: int = 1) -> dict | None:
    """Aggregate replies given as (node id, uploaded state, num-examples); the new global state or None."""
    strategy.global_state = global_state
    replies = [reply_to(train_message(node, global_state), s, n, loss=0.1) for node, s, n in spec]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else arrays.to_torch_state_dict()


def run_thorn(strategy, states: list[dict], examples: list[int], global_state: dict) -> dict:
    """Our strategy on the same replies `replies_for` builds for Flower's."""
    strategy.global_state = global_state
    arrays, _ = strategy.aggregate_train(1, replies_for(states, examples, global_state))
    return arrays.to_torch_state_dict()


def assert_same(thorn: dict, flower: ArrayRecord) -> None:
    """Our aggregate equals Flower's (same keys, 1e-5 relative)."""
    theirs = flower.to_torch_state_dict()
    assert list(theirs) == list(thorn)
    for k in thorn:
        torch.testing.assert_close(thorn[k], theirs[k], rtol=1e-5, atol=1e-6)
