"""The round's ReplyStack (strategies/stack.py): the replies' own bytes read as one matrix must give the
same aggregates as the per-reply state dicts they replace, keep invalid replies out of it, never copy the
models, and never write into the replies."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flower_messages import reply_to, train_message
from flwr.app import Array

from server.app import build_strategy
from strategies.aggregation import select_columns
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


def test_array_view_caches_headers_not_data():
    first, second = np.arange(6, dtype=np.float32), np.arange(6, 12, dtype=np.float32)
    assert npy_bytes(first)[:64] == npy_bytes(second)[:64]  # the same header
    np.testing.assert_array_equal(array_view(npy_bytes(first)), first)
    np.testing.assert_array_equal(array_view(npy_bytes(second)), second)
    version_2 = io.BytesIO()
    np.lib.format.write_array(version_2, np.arange(4, dtype=np.int16), version=(2, 0))
    np.testing.assert_array_equal(array_view(version_2.getvalue()), np.arange(4, dtype=np.int16))


def stack_of(rows: list[dict[str, torch.Tensor]], template: dict[str, torch.Tensor], leading: list[str]) -> ReplyStack:
    stack = ReplyStack(template, leading)
    for state in rows:
        stack.append(state)
    return stack


def test_gather_reads_column_blocks_across_entries_with_the_offset_subtracted():
    template = {"a": torch.zeros(2, 3), "b": torch.zeros(1), "c": torch.zeros(4), "n": torch.tensor(0)}
    gen = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in template.items()}
              for _ in range(4)]
    stack = stack_of(states, template, ["c", "a"])
    assert stack.keys == ["c", "a", "b"] and stack.width == 11 and stack.vectors_for(["c", "a"]) == 10
    dense = torch.stack([torch.cat([s["c"], s["a"].reshape(-1), s["b"]]) for s in states])
    offset = torch.randn(11, generator=gen)
    for start, end in [(0, 11), (3, 9), (4, 5), (10, 11), (0, 4)]:
        torch.testing.assert_close(stack.gather([2, 0], start, end), dense[[2, 0], start:end], rtol=0, atol=0)
        torch.testing.assert_close(stack.gather([1, 3], start, end, offset),
                                   dense[[1, 3], start:end] - offset[start:end])
    columns = stack.columns([3, 1], width=10)
    assert columns.shape == (2, 10)
    torch.testing.assert_close(columns.dense(), dense[[3, 1], :10], rtol=0, atol=0)
    torch.testing.assert_close(columns.block(torch.tensor([1]), 2, 7), dense[[1], 2:7], rtol=0, atol=0)
    # no copy: the rows are the states' own memory
    assert np.shares_memory(stack.rows[0][1], states[0]["a"].numpy())


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
    """aggregate_train (replies read in place as the stack's rows, with invalid replies between valid ones)
    gives the aggregate that the same rule gives on hand-built updates, and leaves the replies unchanged."""
    model, global_state, replies = round_of_replies(11, seed=3, bad={2: "nan", 5: "shape", 8: "nan-buffer"})
    sent = [{k: bytes(a.data) for k, a in msg.content["arrays"].items()} for msg in replies]
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
    assert [{k: bytes(a.data) for k, a in msg.content["arrays"].items()} for msg in replies] == sent


def test_updates_are_views_of_the_replies_in_sorted_order(flower_task_identity):
    model, global_state, replies = round_of_replies(6, seed=1, bad={1: "nan"})
    seen = {}

    strategy = build_strategy(compose_config(["strategy=fedavg", "num_clients=6"]))
    strategy.trainable_keys = trainable_state_keys(model)
    strategy.global_state = global_state

    def capture(server_round, global_state, updates):
        seen["updates"] = updates
        return type(strategy).aggregate_updates(strategy, server_round, global_state, updates)

    strategy.aggregate_updates = capture
    strategy.aggregate_train(1, list(reversed(replies)))
    updates = seen["updates"]
    stack = updates[0].stack
    # every structurally valid reply is a row (the NaN one too: the norm check runs over the rows)
    rows = [u.row for u in updates]
    assert len(updates) == 5 and stack.used == 6 and rows == sorted(rows)
    assert [content_key(u) for u in updates] == sorted(content_key(u) for u in updates)
    for u in updates:
        record = replies[[r.metadata.src_node_id for r in replies].index(u.node_id)].content["arrays"]
        assert np.shares_memory(u.state["fc.weight"].numpy(), array_view(record["fc.weight"].data))  # no copy
        assert u.state["bn.num_batches_tracked"].dtype == torch.int64  # not in the float32 matrix
        torch.testing.assert_close(u.state["conv.weight"], record.to_torch_state_dict()["conv.weight"])
    keys = trainable_state_keys(model)
    matrix, reference = update_vectors(updates, keys, global_state)
    assert matrix.shape == (5, sum(global_state[k].numel() for k in keys))
    torch.testing.assert_close(matrix.dense(), torch.stack([torch.cat([u.state[k].reshape(-1) for k in keys])
                                                            for u in updates]), rtol=0, atol=0)
    torch.testing.assert_close(reference, torch.cat([global_state[k].reshape(-1) for k in keys]))
    subset, _ = update_vectors(updates[1:4:2], keys, global_state)
    torch.testing.assert_close(subset.dense(), matrix.dense()[[1, 3]], rtol=0, atol=0)


def test_non_float32_entries_stay_outside_the_matrix(flower_task_identity):
    global_state = {"w": torch.zeros(2, dtype=torch.float64), "v": torch.zeros(3), "n": torch.tensor(0)}
    stack = ReplyStack(global_state, ["w", "v"])
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


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(flower_task_identity):
    model, global_state, replies = round_of_replies(7, seed=5, bad={3: "nan"})

    def run(arrival):
        strategy = build_strategy(compose_config(["strategy=trimmed_mean", "num_clients=7"]))
        strategy.trainable_keys = trainable_state_keys(model)
        strategy.global_state = global_state
        arrays, _ = strategy.aggregate_train(2, arrival)
        return arrays.to_torch_state_dict()

    forward, backward = run(replies), run([replies[i] for i in (4, 0, 6, 2, 3, 5, 1)])
    for k in forward:
        torch.testing.assert_close(forward[k], backward[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fedavg", "krum", "multikrum", "bulyan", "dnc", "pruning"])
@pytest.mark.parametrize("bad", [{5: "shape"}, {5: "shape", 7: "nan"}])
def test_the_validation_pass_statistics_give_the_aggregate_of_separate_passes(flower_task_identity, name, bad):
    """Krum's Gram matrix and the example-weighted sum computed by the round's validation pass (shares_gram,
    shares_example_sum) give what computing them afresh gives, with rows left out for a NaN (whose row is in
    the pass) or a wrong shape (whose row is not)."""
    model, global_state, replies = round_of_replies(11, seed=7, bad=bad)
    cfg = compose_config([f"strategy={name}", "num_clients=11", "min_train_clients=1", "strategy.num_malicious=1"]
                         if name in ("krum", "multikrum", "bulyan") else
                         [f"strategy={name}", "num_clients=11", "min_train_clients=1"])

    def run(**attributes):
        strategy = build_strategy(cfg)
        strategy.trainable_keys = trainable_state_keys(model)
        strategy.global_state = global_state
        for key, value in attributes.items():
            setattr(strategy, key, value)
        arrays, _ = strategy.aggregate_train(3, replies)
        return arrays.to_torch_state_dict(), strategy.last_report

    shared, shared_report = run()
    separate, separate_report = run(shares_gram=False, shares_example_sum=False)
    assert shared_report.rejected == separate_report.rejected and shared_report.invalid == separate_report.invalid
    for k in shared:
        torch.testing.assert_close(shared[k], separate[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def test_krum_takes_its_distances_from_the_validation_pass(flower_task_identity, monkeypatch):
    model, global_state, replies = round_of_replies(9, seed=2, bad={4: "nan"})
    strategy = build_strategy(compose_config(["strategy=multikrum", "num_clients=9", "strategy.num_malicious=1"]))
    strategy.trainable_keys = trainable_state_keys(model)
    strategy.global_state = global_state
    expected, _ = strategy.aggregate_train(1, replies)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the Gram matrix was computed again")

    monkeypatch.setattr("strategies.base.gram_matrix", no_second_pass)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(strategy.last_report.invalid) == [104]
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, expected.to_torch_state_dict()[k], rtol=0, atol=0)


@pytest.mark.parametrize("block", [3, 4, 1 << 18])
def test_select_columns_reads_any_columns_of_either_kind_of_matrix(monkeypatch, block):
    """aggregation.select_columns on a tensor and on the stack's columns: any order, repeats, rows, offset,
    and column blocks smaller than the matrix (so indices fall in several blocks)."""
    monkeypatch.setattr("strategies.aggregation.COLUMN_BLOCK", block)
    template = {"a": torch.zeros(2, 3), "b": torch.zeros(5)}
    gen = torch.Generator().manual_seed(1)
    states = [{k: torch.randn(v.shape, generator=gen) for k, v in template.items()} for _ in range(3)]
    stack = stack_of(states, template, ["a", "b"])
    dense = torch.stack([torch.cat([s["a"].reshape(-1), s["b"]]) for s in states])
    index, rows, offset = torch.tensor([10, 0, 4, 4, 7, 3]), torch.tensor([2, 0]), torch.randn(11, generator=gen)
    expected = (dense[rows] - offset)[:, index]
    for matrix in (dense, stack.columns([0, 1, 2])):
        torch.testing.assert_close(select_columns(matrix, index, rows, offset), expected, rtol=0, atol=0)
        torch.testing.assert_close(select_columns(matrix, index), dense[:, index], rtol=0, atol=0)
