"""The round's ReplyStack (strategies/stack.py): replies decoded straight into one matrix must give the
same aggregates as the per-reply state dicts they replace, keep invalid replies out of it, and never
copy the matrix whole."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flower_messages import reply_to, train_message
from flwr.app import Array

from server.app import build_strategy
from strategies.base import ClientUpdate, content_key, update_vectors
from strategies.stack import ReplyStack, array_view
from task.config import compose_config, group_options
from task.models import trainable_state_keys


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.array(7, dtype=np.int64),
    np.zeros((0, 5), dtype=np.float32),
    np.arange(6, dtype=np.float16).reshape(2, 3),
])
def test_array_view_reads_what_numpy_load_reads(array):
    view = array_view(npy_bytes(array))
    np.testing.assert_array_equal(view, np.load(io.BytesIO(npy_bytes(array))))
    assert view.dtype == array.dtype and view.shape == array.shape


def test_array_view_refuses_object_arrays():
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    header = buffer.getvalue()  # magic string and header
    with pytest.raises(ValueError, match="object"):
        array_view(header + b"\x80\x04N.")  # a pickle would follow: never unpickled


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 2, 3, 4, 0], [2, 0, 1, 4, 3], [0, 2, 1, 3, 4]])
def test_reorder_applies_the_permutation_in_place(order):
    template = {"w": torch.zeros(3), "b": torch.zeros(2)}
    stack = ReplyStack(template, ["w", "b"], capacity=5)
    stack.matrix.copy_(torch.arange(25, dtype=torch.float32).reshape(5, 5))
    before = stack.matrix.clone()
    pointer = stack.matrix.data_ptr()
    stack.reorder(order)
    torch.testing.assert_close(stack.matrix, before[order])
    assert stack.matrix.data_ptr() == pointer


def test_reorder_rejects_a_non_permutation():
    stack = ReplyStack({"w": torch.zeros(2)}, ["w"], capacity=3)
    with pytest.raises(ValueError, match="permutation"):
        stack.reorder([0, 0, 1])


class TinyBN(torch.nn.Module):
    """Conv + BatchNorm (float running statistics, an int64 counter) + Linear: every kind of entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def round_of_replies(n: int, seed: int, bad: dict[int, str]):
    """The global model, n replies (global + noise, BN statistics and counters varied), and the
    positions in `bad` replaced by malformed replies of the given kind."""
    gen = torch.Generator().manual_seed(seed)
    model = TinyBN()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    replies = []
    for i in range(n):
        state = {k: (v + 0.1 * torch.randn(v.shape, generator=gen)) if torch.is_floating_point(v) else v + i
                 for k, v in global_state.items()}
        if bad.get(i) == "nan":
            state["fc.weight"] = state["fc.weight"].clone()
            state["fc.weight"][0, 0] = float("nan")
        elif bad.get(i) == "shape":
            state["fc.bias"] = torch.zeros(5)
        elif bad.get(i) == "nan-buffer":
            state["bn.running_var"] = torch.full((3,), float("inf"))
        replies.append(reply_to(train_message(100 + i, global_state), state, 10 + 3 * i))
    return model, global_state, replies


NAMES = [name for name in group_options("strategy") if name not in ("sdfc", "clipfed", "pruning", "fltrust")]


@pytest.mark.parametrize("name", NAMES)
def test_stacked_round_equals_the_per_reply_state_dicts(flower_task_identity, name):
    """aggregate_train (replies decoded into the stack, with invalid replies between valid ones, so rows
    are reused and reordered) gives the aggregate that the same rule gives on hand-built updates."""
    model, global_state, replies = round_of_replies(11, seed=3, bad={2: "nan", 5: "shape", 8: "nan-buffer"})
    cfg = compose_config([f"strategy={name}", "num_clients=8", "min_train_clients=1"])

    stacked = build_strategy(cfg)
    stacked.trainable_keys = trainable_state_keys(model)
    stacked.global_state = global_state
    arrays, _ = stacked.aggregate_train(4, replies)
    assert sorted(stacked.last_report.invalid) == [102, 105, 108]

    plain = build_strategy(cfg)
    plain.trainable_keys = trainable_state_keys(model)
    updates = [ClientUpdate(node_id=msg.metadata.src_node_id, state=msg.content["arrays"].to_torch_state_dict(),
                            num_examples=int(msg.content["metrics"]["num-examples"]), metrics={"train-loss": 0.5})
               for i, msg in enumerate(replies) if i not in (2, 5, 8)]
    updates.sort(key=content_key)
    expected = plain.aggregate_updates(4, global_state, updates)

    ours = arrays.to_torch_state_dict()
    assert list(ours) == list(expected.state)
    for k in ours:
        torch.testing.assert_close(ours[k], expected.state[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    assert stacked.last_report.weights == pytest.approx(expected.weights)


def test_updates_are_views_of_one_matrix_in_sorted_order(flower_task_identity):
    model, global_state, replies = round_of_replies(6, seed=1, bad={1: "nan"})
    seen = {}

    strategy = build_strategy(compose_config(["strategy=fedavg", "num_clients=6"]))
    strategy.trainable_keys = trainable_state_keys(model)
    strategy.global_state = global_state

    def capture(server_round, global_state, updates):
        seen["updates"] = updates
        return type(strategy).aggregate_updates(strategy, server_round, global_state, updates)

    strategy.aggregate_updates = capture
    strategy.aggregate_train(1, replies)
    updates = seen["updates"]
    stack = updates[0].stack
    assert stack.used == 5 and [u.row for u in updates] == list(range(5))
    assert [content_key(u) for u in updates] == sorted(content_key(u) for u in updates)
    for i, u in enumerate(updates):
        assert u.state["fc.weight"].data_ptr() == stack.row_views(i)["fc.weight"].data_ptr()
        assert u.state["bn.num_batches_tracked"].dtype == torch.int64  # not in the float32 matrix
        decoded = replies[[r.metadata.src_node_id for r in replies].index(u.node_id)].content["arrays"]
        torch.testing.assert_close(u.state["conv.weight"], decoded.to_torch_state_dict()["conv.weight"])
    keys = trainable_state_keys(model)
    matrix, rows, reference = update_vectors(updates, keys, global_state)
    assert rows is None and matrix.data_ptr() == stack.matrix.data_ptr()  # a view, not a copy
    torch.testing.assert_close(reference, torch.cat([global_state[k].reshape(-1) for k in keys]))
    subset_matrix, subset_rows, _ = update_vectors(updates[1:4:2], keys, global_state)
    assert subset_rows.tolist() == [1, 3]


def test_non_float32_entries_stay_outside_the_matrix(flower_task_identity):
    global_state = {"w": torch.zeros(2, dtype=torch.float64), "v": torch.zeros(3), "n": torch.tensor(0)}
    stack = ReplyStack(global_state, ["w", "v"], capacity=2)
    assert stack.keys == ["v"] and stack.vectors_for(["w", "v"]) is None and stack.vectors_for(["v"]) is None
    replies = [reply_to(train_message(100 + i, global_state),
                        {"w": torch.full((2,), float(i), dtype=torch.float64), "v": torch.full((3,), float(i)),
                         "n": torch.tensor(i)}, 1) for i in range(3)]
    strategy = build_strategy(compose_config(["strategy=median", "num_clients=3"]))
    strategy.trainable_keys = ["w", "v"]
    strategy.global_state = global_state
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    assert out["w"].dtype == torch.float64 and out["w"].tolist() == [1.0, 1.0] and out["v"].tolist() == [1.0] * 3


def test_an_array_record_with_a_foreign_serialisation_is_rejected_not_fatal(flower_task_identity):
    model, global_state, replies = round_of_replies(4, seed=0, bad={})
    record = replies[0].content["arrays"]
    record["fc.bias"] = Array(dtype="float32", shape=(2,), stype="unknown", data=b"\x00" * 8)
    strategy = build_strategy(compose_config(["strategy=fedavg", "num_clients=4"]))
    strategy.global_state = global_state
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and list(strategy.last_report.invalid) == [100]
    assert "cannot be read" in strategy.last_report.invalid[100]


def test_replies_are_decoded_in_sorted_order_and_rows_move_when_they_were_not(flower_task_identity, monkeypatch):
    model, global_state, replies = round_of_replies(7, seed=5, bad={3: "nan"})
    for msg in replies:  # the key read from the serialised arrays is the decoded update's content_key
        from strategies.base import reply_order_key, update_from_message
        if msg.metadata.src_node_id != 103:
            assert reply_order_key(msg, global_state) == content_key(update_from_message(msg, global_state))

    original = ReplyStack.reorder

    def run(order_key):
        monkeypatch.setattr("strategies.base.reply_order_key", order_key)
        strategy = build_strategy(compose_config(["strategy=trimmed_mean", "num_clients=7"]))
        strategy.trainable_keys = trainable_state_keys(model)
        strategy.global_state = global_state
        moved = []
        monkeypatch.setattr(ReplyStack, "reorder", lambda self, order: (moved.append(list(order)),
                                                                        original(self, order)))
        arrays, _ = strategy.aggregate_train(2, list(reversed(replies)))
        return arrays.to_torch_state_dict(), moved

    from strategies.base import reply_order_key as real_key
    sorted_first, moved_sorted = run(real_key)
    unsorted_first, moved_unsorted = run(lambda msg, g: (0, 0))  # arrival order: rows must be permuted
    assert moved_sorted == [] and len(moved_unsorted) == 1 and moved_unsorted[0] != list(range(6))
    for k in sorted_first:
        torch.testing.assert_close(sorted_first[k], unsorted_first[k], rtol=0, atol=0)
