"""SDFC (strategies/sdfc.py): the sanity checks of ../shared/specs/algorithms.md §6, the Fisher estimators,
the batched server Fisher, and the client half through the real ClientApp train handler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flower_messages import reply_to, train_message
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from strategies.base import ServerContext
from strategies.fedavg import FedAvgStrategy
from strategies.sdfc import (
    DIFF_RECORD,
    FLOC_RECORD,
    FVAL_RECORD,
    FisherCalibrationStrategy,
    calibration_weights,
    fisher_diagonal,
    fisher_difference,
    fisher_of_states,
    fisher_regularizer,
    fisher_score,
)
from task.data import InputSpec
from task.train import LocalTrainingConfig


class TinyNet(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def batches(n_batches=4, size=8, seed=0, single_class=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(size, 4, generator=g)
        y = torch.full((size,), b % 3) if single_class else torch.randint(0, 3, (size,), generator=g)
        out.append((x, y))
    return out


# ---- §6 sanity checks ----------------------------------------------------------------------------
def test_weights_sum_to_one_and_stay_within_e_of_each_other():
    scores = torch.tensor([0.3, 5.0, 1.2, 9.9, 2.0], dtype=torch.float64)
    w = calibration_weights(scores)
    z = torch.exp(-(scores - scores.min()) / (scores.max() - scores.min())).sum()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    assert float(w.min()) >= math.exp(-1) / float(z) - 1e-12 and float(w.max()) <= 1 / float(z) + 1e-12
    assert int(w.argmax()) == 0 and int(w.argmin()) == 3  # the lowest Fisher difference weighs most
    assert math.isclose(float(w.max() / w.min()), math.e, rel_tol=1e-9)


def test_identical_scores_give_uniform_weights():
    w = calibration_weights([2.5, 2.5, 2.5, 2.5])
    assert torch.equal(w, torch.full((4,), 0.25, dtype=torch.float64))  # the max == min guard, no NaN


def test_code_cross_equals_per_sample_when_every_batch_holds_one_class():
    model = TinyNet()
    one_class = batches(single_class=True)
    a = fisher_diagonal(model, one_class, "code_cross")
    b = fisher_diagonal(model, one_class, "per_sample")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-10)
    # ... and differs on mixed batches (the code's [:, y] cross-indexing is not the per-sample likelihood)
    mixed = batches()
    a, b = fisher_diagonal(model, mixed, "code_cross"), fisher_diagonal(model, mixed, "per_sample")
    assert any(not torch.allclose(a[n], b[n]) for n in a)


def test_code_fisher_is_the_square_of_the_mean_gradient():
    model, data = TinyNet(), batches()
    f = fisher_diagonal(model, data, "per_sample")
    grads = []
    for x, y in data:
        model.zero_grad()
        torch.log_softmax(model(x), 1).gather(1, y[:, None]).mean().backward()
        grads.append(model.fc1.weight.grad.clone())
    torch.testing.assert_close(f["fc1.weight"], torch.stack(grads).mean(0) ** 2)


def test_empirical_fisher_is_the_mean_of_squared_per_sample_gradients():
    model, data = TinyNet(), batches(n_batches=2, size=3)
    f = fisher_diagonal(model, data, "empirical")
    squares = []
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            torch.log_softmax(model(x[i:i + 1]), 1)[0, y[i]].backward()
            squares.append(model.fc2.bias.grad.clone() ** 2)
    torch.testing.assert_close(f["fc2.bias"], torch.stack(squares).mean(0), rtol=1e-5, atol=1e-8)


def test_batched_and_looped_server_fisher_agree():
    model = TinyNet()
    states = []
    for seed in range(5):
        torch.manual_seed(seed)
        states.append({k: v.clone() for k, v in TinyNet().state_dict().items()})
    data = batches()
    looped = fisher_of_states(model, states, data, batched="loop")
    vmapped = fisher_of_states(model, states, data, batched="vmap", chunk=2)  # chunks of 2, 2, 1
    assert len(looped) == len(vmapped) == 5
    for a, b in zip(looped, vmapped, strict=True):
        for n in a:  # to 1e-6 of the tensor's scale (float32 gradients, summed in another order)
            assert float((a[n] - b[n]).abs().max()) <= 1e-6 * float(a[n].abs().max())
    # different models -> different Fisher (the batched path really evaluated each one)
    assert not torch.allclose(vmapped[0]["fc1.weight"], vmapped[1]["fc1.weight"])


def test_batchnorm_models_fall_back_to_the_loop():
    model = TinyNet(batchnorm=True)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    assert len(fisher_of_states(model, states, batches(), batched="auto")) == 1
    with pytest.raises(ValueError, match="BatchNorm"):
        fisher_of_states(model, states, batches(), batched="vmap")


def test_difference_score_and_regularizer():
    f_loc = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.5]])}
    f_val = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([[0.0]])}
    d = fisher_difference(f_loc, f_val)
    assert torch.equal(d["a"], torch.tensor([1.0, 2.0]))
    assert fisher_score(d) == pytest.approx((3.0 + 0.5) / 2)  # mean over tensors of per-tensor sums
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    reg = fisher_regularizer(model, {"weight": torch.tensor([[3.0, 0.5]])}, {"weight": torch.tensor([[0.0, 0.0]])},
                             lam=2.0)
    assert float(reg.detach()) == pytest.approx(2.0 * (3.0 * 1 + 0.5 * 4))


# ---- the server strategy on hand-made replies ------------------------------------------------------
def make_strategy(**kwargs) -> FisherCalibrationStrategy:
    strategy = FisherCalibrationStrategy(**kwargs)
    spec = InputSpec(mean=(0.0,), std=(1.0,), image_size=2, channels=1)
    rng = np.random.default_rng(0)
    strategy.server_context = ServerContext(
        x_val=rng.integers(0, 255, (40, 2, 2, 1), dtype=np.uint8), y_val=rng.integers(0, 3, 40),
        spec=spec, build_model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        device=torch.device("cpu"), local=LocalTrainingConfig(epochs=1, lr=0.1, batch_size=8))
    return strategy


def client_states(n: int, same: bool = False):
    out = []
    for i in range(n):
        torch.manual_seed(0 if same else i)
        out.append({k: v.clone() for k, v in nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).state_dict().items()})
    return out


def sdfc_reply(node: int, state: dict, f_loc: dict, num_examples: int) -> Message:
    reply = reply_to(train_message(node, state), state, num_examples)
    reply.content[FLOC_RECORD] = ArrayRecord({k: v.clone() for k, v in f_loc.items()})
    return reply


def test_identical_clients_give_uniform_weights_and_lambda_zero_equals_unweighted_fedavg(flower_task_identity):
    strategy = make_strategy()
    states = client_states(3, same=True)
    f_loc = {k: torch.rand_like(v) for k, v in states[0].items()}
    strategy.global_state = states[0]
    replies = [sdfc_reply(10 + i, s, f_loc, n) for i, (s, n) in enumerate(zip(states, [5, 50, 500], strict=True))]
    strategy.aggregate_train(1, replies)
    report = strategy.last_report
    assert all(w == pytest.approx(1 / 3) for w in report.weights.values())  # NOT weighted by example counts
    # with uniform weights (lambda = 0 leaves the clients' training untouched) SDFC's aggregate is the
    # unweighted mean, which FedAvg gives on equal example counts
    states = client_states(3)
    strategy = make_strategy(lam=0.0)
    strategy.global_state = states[0]
    # F_loc = F_val for every client -> D = 0 -> equal scores -> uniform weights
    replies = [sdfc_reply(20 + i, s, strategy.validation_fisher([s], 1)[0], n)
               for i, (s, n) in enumerate(zip(states, [5, 50, 500], strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    sdfc_state = arrays.to_torch_state_dict()
    fedavg = FedAvgStrategy()
    fedavg.global_state = states[0]
    fed_arrays, _ = fedavg.aggregate_train(1, [reply_to(train_message(30 + i, s), s, 7) for i, s in enumerate(states)])
    for k, v in fed_arrays.to_torch_state_dict().items():
        torch.testing.assert_close(sdfc_state[k], v, rtol=1e-6, atol=1e-7)


def test_server_scores_clients_by_fisher_difference_and_keeps_d_for_next_round(flower_task_identity):
    strategy = make_strategy()
    states = client_states(3)
    strategy.global_state = states[0]
    f_vals = strategy.validation_fisher(states, 1)
    # client 2 claims a local Fisher far from the validation one: it gets the smallest weight
    f_locs = [f_vals[0], {k: v + 0.01 for k, v in f_vals[1].items()}, {k: v + 1.0 for k, v in f_vals[2].items()}]
    replies = [sdfc_reply(40 + i, s, f, 10) for i, (s, f) in enumerate(zip(states, f_locs, strict=True))]
    strategy.aggregate_train(1, replies)
    w = strategy.last_report.weights
    assert w[40] > w[41] > w[42] and w[40] / w[42] == pytest.approx(math.e, rel=1e-6)
    # D_k goes back to each client in its next train message; a node never seen gets F_val(θ_g)
    strategy.global_state = states[0]
    records = strategy.client_records(2, 42)
    assert DIFF_RECORD in records
    d = records[DIFF_RECORD].to_torch_state_dict()
    torch.testing.assert_close(d["1.bias"], torch.full_like(d["1.bias"], 1.0), rtol=1e-5, atol=1e-5)
    assert FVAL_RECORD in strategy.client_records(2, 99)
    # the per-client D_k survive a checkpoint
    restored = make_strategy()
    restored.load_state_dict(strategy.state_dict())
    assert set(restored.differences) == {40, 41, 42}


def test_a_reply_without_its_fisher_is_rejected_and_the_round_goes_on(flower_task_identity):
    strategy = make_strategy()
    states = client_states(3)
    strategy.global_state = states[0]
    f_vals = strategy.validation_fisher(states, 1)
    good = [sdfc_reply(50 + i, s, f, 10) for i, (s, f) in enumerate(zip(states[:2], f_vals[:2], strict=True))]
    missing = reply_to(train_message(52, states[2]), states[2], 10)
    negative = sdfc_reply(53, states[2], {k: -torch.ones_like(v) for k, v in f_vals[2].items()}, 10)
    arrays, _ = strategy.aggregate_train(1, [*good, missing, negative])
    report = strategy.last_report
    assert arrays is not None and sorted(report.node_ids) == [50, 51]
    assert "no 'sdfc-floc'" in report.invalid[52] and "negative" in report.invalid[53]


def test_bad_options_fail_with_the_key():
    with pytest.raises(ValueError, match="strategy.fisher='fancy'"):
        FisherCalibrationStrategy(fisher="fancy")
    with pytest.raises(ValueError, match="strategy.anchor"):
        FisherCalibrationStrategy(anchor="elsewhere")
    with pytest.raises(ValueError, match="strategy.lam"):
        FisherCalibrationStrategy(lam=-1)


# ---- the client half through the ClientApp's train handler ---------------------------------------
def client_context(tiny_idx_root, partition_id: int, extra: str = "") -> Context:
    overrides = (f"strategy=sdfc num_clients=3 dataset.root={tiny_idx_root} local.epochs=1 local.batch_size=16 "
                 f"attack.malicious_ids=[2] {extra}")
    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id,
                                                                      "num-partitions": 3},
                   state=RecordDict(), run_config={"overrides": overrides})


def sdfc_train_message(global_state: dict, server_round: int, records: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord(global_state),
                          "config": ConfigRecord({"server-round": server_round}), **records})
    msg = Message(content, dst_node_id=100, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"id-{server_round}"
    return msg


def test_client_half_bootstraps_uploads_its_fisher_and_keeps_its_anchor(tiny_idx_root, flower_task_identity):
    from client.app import run_config_of
    from client.app import train as train_handler
    from strategies.sdfc import ANCHOR_STATE
    from task.data import federated_data
    from task.train import build_model

    context = client_context(tiny_idx_root, 0)
    cfg = run_config_of(context)
    data = federated_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.spec, data.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [n for n, p in model.named_parameters()]
    f_val = {n: torch.full_like(p, 1e-4) for n, p in model.named_parameters()}
    reply = train_handler(sdfc_train_message(global_state, 1, {FVAL_RECORD: ArrayRecord(f_val)}), context)
    assert FLOC_RECORD in reply.content and "arrays" in reply.content
    f_loc = reply.content[FLOC_RECORD].to_torch_state_dict()
    assert list(f_loc) == params and all((f >= 0).all() for f in f_loc.values())
    uploaded = reply.content["arrays"].to_torch_state_dict()
    anchor = context.state[ANCHOR_STATE].to_torch_state_dict()
    torch.testing.assert_close(anchor["conv1.weight"], uploaded["conv1.weight"])  # C4: next round's anchor

    # round 2 with a large D_k: the penalty pins the model to its anchor (the previous local model); an
    # explicit penalty step lr * 2 * lam * D must stay below 1 or SGD diverges, hence 5, not 1e6
    huge = {n: torch.full_like(p, 5.0) for n, p in model.named_parameters()}
    reply2 = train_handler(sdfc_train_message(uploaded, 2, {DIFF_RECORD: ArrayRecord(huge)}), context)
    pinned = reply2.content["arrays"].to_torch_state_dict()
    # ... and with D_k = 0 the same round trains freely
    free_ctx = client_context(tiny_idx_root, 0)
    free_ctx.state[ANCHOR_STATE] = ArrayRecord(anchor)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    free = train_handler(sdfc_train_message(uploaded, 2, {DIFF_RECORD: ArrayRecord(zero)}), free_ctx)
    free = free.content["arrays"].to_torch_state_dict()
    moved_pinned = sum(float((pinned[n] - uploaded[n]).abs().sum()) for n in params)
    moved_free = sum(float((free[n] - uploaded[n]).abs().sum()) for n in params)
    assert moved_pinned < 0.2 * moved_free


def test_client_without_d_or_f_val_fails_loudly(tiny_idx_root, flower_task_identity):
    from client.app import train as train_handler

    context = client_context(tiny_idx_root, 1)
    from client.app import run_config_of
    from task.data import federated_data
    from task.train import build_model

    cfg = run_config_of(context)
    data = federated_data(cfg)
    state = build_model(cfg, data.spec, data.num_classes).state_dict()
    with pytest.raises(ValueError, match="neither a Fisher difference nor F_val"):
        train_handler(sdfc_train_message(state, 1, {}), context)

