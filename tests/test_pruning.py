"""Wu et al. federated pruning (strategies/pruning.py): the spec's sanity checks (algorithms.md §6) on toy
models, the client half's queries and mask, the strategy's phases on a fake grid, and one slow run of the
four phases through a real `flwr run`."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from strategies.pruning import (
    ACCURACY_ACTION,
    ACTIVATIONS_ACTION,
    MASK_KEY,
    FederatedPruningStrategy,
    PruningClientHalf,
    accuracy_per_rate,
    adjust_extreme_weights,
    aggregate_accuracies,
    apply_mask,
    apply_mask_to_model,
    choose_rate,
    extreme_weight_mask,
    find_pruning_target,
    keep_mask,
    mean_channel_activations,
    pruning_sequence,
)


class ConvBN(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU(inplace) -> pool -> fc: the VGG pattern, tiny."""

    def __init__(self, channels: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                      nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x):
        return self.head(self.features(x))


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters (β ≠ 0 is what keeps a half-removed channel alive)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g).abs() + 0.5)


def layer_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out.clone()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["out"]


# ---- which layer, and removing its channels ------------------------------------------------------------
def test_target_is_the_last_conv_and_its_batchnorm():
    target = find_pruning_target(ConvBN().state_dict())
    assert (target.layer, target.norm, target.channels, target.kind) == ("features.3", "features.4", 6, "conv")
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    target = find_pruning_target(mlp.state_dict())  # no conv: the last hidden layer's units
    assert (target.layer, target.norm, target.channels, target.kind) == ("2", "3", 7, "linear")
    from task.models import VGG11, CNN3Conv2FC
    assert find_pruning_target(VGG11(3, 10, 32).state_dict()).norm == "features.26"
    assert find_pruning_target(CNN3Conv2FC(1, 10, 28).state_dict()).layer == "conv3"


@pytest.mark.parametrize("apply", ["state", "model"])
def test_pruned_channels_output_exactly_zero_batchnorm_included(apply):
    torch.manual_seed(0)
    model = ConvBN()
    randomise_bn(model)
    target = find_pruning_target(model.state_dict())
    keep = keep_mask(torch.tensor([4, 1, 0, 2, 3, 5]), target.channels, 0.5)  # removes 4, 1, 0
    assert keep.tolist() == [False, False, True, True, False, True]
    x = torch.randn(8, 1, 5, 5)
    before = layer_output(model, "features.5", x)
    assert (before[:, ~keep] != 0).any()  # the check below could fail
    if apply == "state":
        model.load_state_dict(apply_mask(model.state_dict(), target, keep))
    else:
        apply_mask_to_model(model, target, keep)
    after = layer_output(model, "features.5", x)  # after BN and ReLU
    assert torch.equal(after[:, ~keep], torch.zeros_like(after[:, ~keep]))
    assert torch.equal(layer_output(model, "features.4", x)[:, ~keep], torch.zeros_like(after[:, ~keep]))
    torch.testing.assert_close(after[:, keep], before[:, keep])  # the kept channels are untouched
    # zeroing only the filter is not enough with BN: β keeps the channel alive
    fresh = ConvBN()
    randomise_bn(fresh)
    with torch.no_grad():
        fresh.features[3].weight[~keep] = 0
        fresh.features[3].bias[~keep] = 0
    assert (layer_output(fresh, "features.5", x)[:, ~keep] != 0).any()


def test_mask_survives_local_training_through_the_client_half():
    torch.manual_seed(0)
    model = ConvBN()
    target = find_pruning_target(model.state_dict())
    keep = torch.tensor([True, False, True, False, True, True])
    half = PruningClientHalf(RecordDict(), SimpleNamespace(model=model))
    half.before_training(RecordDict({MASK_KEY: ArrayRecord({"keep": keep.float()})}), 11)
    model.load_state_dict(apply_mask(model.state_dict(), target, keep))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 1, 5, 5)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        half.after_step(model)
    for key in target.keys(model.state_dict()):
        assert torch.count_nonzero(model.state_dict()[key][~keep]) == 0
        assert torch.count_nonzero(model.state_dict()[key][keep]) > 0
    # an ordinary training round carries no mask: the half leaves the model alone
    plain = PruningClientHalf(RecordDict(), SimpleNamespace(model=model))
    plain.before_training(RecordDict({"config": ConfigRecord({})}), 3)
    w = model.features[3].weight.detach().clone()
    with torch.no_grad():
        model.features[3].weight.add_(1.0)
    plain.after_step(model)
    torch.testing.assert_close(model.features[3].weight.detach(), w + 1.0)


# ---- phase 1a: dormant channels first -------------------------------------------------------------------
def test_activations_and_sequence_put_dormant_channels_first():
    torch.manual_seed(0)
    model = ConvBN()
    target = find_pruning_target(model.state_dict())
    with torch.no_grad():  # BN shifts make channels 2 and 5 dormant (always ≤ 0 before the ReLU)
        model.features[4].running_mean.zero_()
        model.features[4].running_var.fill_(1.0)
        model.features[4].weight.copy_(torch.tensor([1.0, 1.0, 0.01, 1.0, 1.0, 0.01]))
        model.features[4].bias.copy_(torch.tensor([2.0, 0.5, -5.0, 1.0, 3.0, -4.0]))
    acts = mean_channel_activations(model, target, [torch.randn(16, 1, 5, 5) for _ in range(2)])
    assert acts[2] == 0 and acts[5] == 0 and (acts[[0, 1, 3, 4]] > 0).all()
    order = pruning_sequence([acts], [32])
    assert set(order[:2].tolist()) == {2, 5} and order[-1] == 4  # most active (β = 3) last


def test_sequence_aggregations():
    a = torch.tensor([0.0, 5.0, 1.0, 9.0])
    b = torch.tensor([10.0, 0.3, 0.1, 0.2])  # a client with huge activations on channel 0
    # weighted mean activation: b dominates channel 0 ...
    assert pruning_sequence([a, b], [1, 1], "mean_activation").tolist() == [2, 1, 3, 0]
    # ... weights by example count
    assert pruning_sequence([a, b], [100, 1], "mean_activation").tolist() == [0, 2, 1, 3]
    # mean rank: every client counts once whatever its scale (ranks a: 0,2,1,3; b: 3,2,0,1; ties stay in index order)
    assert pruning_sequence([a, b], [1, 1], "mean_rank").tolist() == [2, 0, 1, 3]
    # vote: each client votes for its 2 most dormant; channel 2 gets both votes
    assert pruning_sequence([a, b], [1, 1], "vote", vote_share=0.5)[0] == 2
    with pytest.raises(ValueError, match="agg='max'"):
        pruning_sequence([a], [1], "max")


# ---- phase 1b: rate ----------------------------------------------------------------------------------------
def test_rate_selection_keeps_the_largest_rate_within_tolerance():
    rates = [0.0, 0.1, 0.2, 0.3, 0.4]
    acc = torch.tensor([0.90, 0.90, 0.88, 0.80, 0.86])
    assert choose_rate(rates, acc, 0.05) == 4  # max{r : drop ≤ τ}, not the first failure
    assert choose_rate(rates, acc, 0.01) == 1
    assert choose_rate(rates, acc, 0.0) == 1   # equal accuracy is within any τ
    assert keep_mask(torch.arange(10), 10, 0.3).sum() == 7  # ⌊0.3·10⌋ = 3 even though 0.3·10 < 3 in floats


def test_median_ignores_one_lying_client():
    rates = [0.0, 0.2, 0.4, 0.6]
    honest = torch.tensor([[0.90, 0.89, 0.80, 0.50],
                           [0.88, 0.88, 0.79, 0.45],
                           [0.92, 0.90, 0.83, 0.55],
                           [0.86, 0.85, 0.78, 0.40]])
    # a lying client with many claimed examples: reports a useless unpruned model and a perfect pruned one,
    # to push the server to prune far more than the honest clients can afford
    liar = torch.tensor([[0.10, 0.99, 0.99, 0.99]])
    counts = [100, 100, 100, 100, 400]
    both = torch.cat([honest, liar])
    truth = choose_rate(rates, aggregate_accuracies(honest, counts[:4], "median"), 0.05)
    assert rates[truth] == 0.2
    assert choose_rate(rates, aggregate_accuracies(both, counts, "median"), 0.05) == truth
    assert rates[choose_rate(rates, aggregate_accuracies(both, counts, "weighted_mean"), 0.05)] == 0.6
    with pytest.raises(ValueError, match="accuracy_agg"):
        aggregate_accuracies(honest, counts[:4], "mode")


def test_raising_the_rate_never_raises_clean_accuracy_much_on_a_toy_model():
    # a 2-layer MLP on a linearly separable toy task; its hidden units ranked on the data, dormant first
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    target = find_pruning_target(model.state_dict())
    assert (target.layer, target.kind) == ("0", "linear")

    def accuracy(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    rates = [round(0.1 * i, 1) for i in range(10)]
    dormant_first = pruning_sequence([mean_channel_activations(model, target, [x])], [len(x)])
    curve = accuracy_per_rate(model, target, dormant_first, rates, accuracy)
    assert curve[0] > 0.95
    assert all(b <= a + 0.02 for a, b in zip(curve, curve[1:], strict=False))  # never up by more than 2 points
    # dormant first is what makes it gentle: the reverse order loses more at moderate rates
    active_first = dormant_first.flip(0)
    reverse = accuracy_per_rate(model, target, active_first, rates, accuracy)
    assert sum(curve[:6]) > sum(reverse[:6])
    assert accuracy(model) == curve[0]  # the sweep leaves the model as it was


# ---- phase 3: extreme weights -------------------------------------------------------------------------
def test_delta_three_on_gaussian_weights_changes_about_0_3_percent():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 128, 3, 3, generator=g) * 0.05 + 0.01
    state = {"conv.weight": weight, "conv.bias": torch.zeros(256)}
    target = find_pruning_target(state)
    adjusted, n = adjust_extreme_weights(state, target, delta=3.0)
    share = n / weight.numel()
    assert 0.0020 < share < 0.0035  # 2·Φ(−3) = 0.27 %
    changed = adjusted["conv.weight"] != weight
    assert int(changed.sum()) == n and (adjusted["conv.weight"][changed] == 0).all()
    assert ((weight[changed] - 0.01).abs() > 3 * 0.05 * 0.98).all()  # only the tails
    assert adjust_extreme_weights(state, target, delta=2.0)[1] > 10 * n  # 4.6 % at δ = 2
    per_filter = extreme_weight_mask(weight, 3.0, per_filter=True).float().mean()
    assert 0.0015 < per_filter < 0.0040


def test_extreme_weight_statistics_ignore_removed_filters():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 16, 3, 3, generator=g)
    keep = torch.ones(40, dtype=torch.bool)
    keep[:30] = False
    weight[~keep] = 0  # 3/4 of the filters pruned: counting their zeros would halve σ
    flagged = extreme_weight_mask(weight, 3.0, keep=keep)
    assert not flagged[~keep].any()
    assert flagged.float().sum() / weight[keep].numel() < 0.01
    naive = extreme_weight_mask(weight, 3.0)  # statistics over all filters, zeros included
    assert naive.sum() > 5 * flagged.sum()


# ---- the client half's queries on real client data -------------------------------------------------------
@pytest.fixture
def client(tiny_idx_root):
    from task.config import compose_config
    from task.data import federated_data
    from task.train import build_model

    cfg = compose_config(["num_clients=2", f"dataset.root={tiny_idx_root}", "model=cnn_3conv_2fc",
                          "strategy=pruning"])
    data = federated_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.spec, data.num_classes)
    x, y = data.client_data(0)
    return SimpleNamespace(model=model, x=x, y=y, data=data, device=torch.device("cpu"), cfg=cfg, partition_id=0)


def test_client_half_answers_both_queries(client):
    half = PruningClientHalf(RecordDict(), client)
    assert set(half.query_actions) == {ACTIVATIONS_ACTION, ACCURACY_ACTION}
    from client.app import DEFENSE_QUERY_ACTIONS  # Flower routes query.<action> only for listed names
    assert set(half.query_actions) <= set(DEFENSE_QUERY_ACTIONS)
    assert all(a.isidentifier() for a in DEFENSE_QUERY_ACTIONS)  # flwr rejects other names at import

    reply = half.query(ACTIVATIONS_ACTION, RecordDict({"config": ConfigRecord({"samples": 50})}))
    acts = reply["pruning"].to_torch_state_dict()["activations"]
    assert acts.shape == (64,) and (acts >= 0).all() and reply["metrics"]["num-examples"] == 50
    order = pruning_sequence([acts], [50])
    rates = [0.0, 0.5, 0.9]
    reply = half.query(ACCURACY_ACTION, RecordDict({"config": ConfigRecord(
        {"order": [int(i) for i in order], "rates": rates, "samples": 0})}))
    accs = list(reply["metrics"]["accuracy"])
    assert len(accs) == 3 and all(0 <= a <= 1 for a in accs) and reply["metrics"]["num-examples"] == len(client.y)
    with pytest.raises(NotImplementedError):
        half.query("identity", RecordDict())


# ---- the strategy's phases on a fake grid ---------------------------------------------------------------
class FakeGrid:
    """Answers queries with preset replies and train messages with the global model plus a nudge."""

    def __init__(self, acts: dict[int, torch.Tensor], accs: dict[int, list[float]]) -> None:
        self.acts, self.accs = acts, accs
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.acts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            if kind == f"query.{ACTIVATIONS_ACTION}":
                content = RecordDict({"pruning": ArrayRecord({"activations": self.acts[node]}),
                                      "metrics": MetricRecord({"num-examples": 10})})
            elif kind == f"query.{ACCURACY_ACTION}":
                content = RecordDict({"metrics": MetricRecord({"accuracy": self.accs[node], "num-examples": 10})})
            else:  # train: every weight + 0.1 (the pruned channels too, as a careless client would)
                state = {k: v + 0.1 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
                content = RecordDict({"arrays": ArrayRecord(state),
                                      "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.3})})
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_post_train_runs_the_four_phases(flower_task_identity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    acts = {1: torch.tensor([0.5, 0.0, 2.0, 0.1]), 2: torch.tensor([0.6, 0.0, 1.0, 0.2])}
    accs = {1: [0.9, 0.9, 0.7], 2: [0.8, 0.79, 0.5]}  # rates 0, 0.25, 0.5: 0.25 is within τ
    grid = FakeGrid(acts, accs)
    strategy = FederatedPruningStrategy(rates=[0.0, 0.25, 0.5], tolerance=0.02, finetune_rounds=2,
                                        min_available_nodes=2)
    final = strategy.post_train(grid, state, 10)
    phases = strategy.post_train_phases
    assert [p["phase"] for p in phases] == ["train", "prune", "finetune", "adjust"]
    assert [p["round"] for p in phases] == [10, 10, 12, 12]
    assert [p["phase_rounds"] for p in phases] == [10, 2, 2, 0]
    assert phases[1]["defense"]["rate"] == 0.25 and phases[1]["defense"]["n_pruned"] == 1
    # channel 1 is dormant everywhere: it is removed, and stays removed through fine-tuning
    for p in phases[1:]:
        assert torch.count_nonzero(p["state"]["0.weight"][1]) == 0 and p["state"]["0.bias"][1] == 0
    assert torch.count_nonzero(final["0.weight"][[0, 2, 3]]) > 0
    # the rate sweep got the sequence; the fine-tuning rounds carried the mask; the rounds continue
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds == [f"query.{ACTIVATIONS_ACTION}"] * 2 + [f"query.{ACCURACY_ACTION}"] * 2 + ["train"] * 4
    assert list(grid.sent[2].content["config"]["order"])[:1] == [1]
    train = grid.sent[4]
    assert train.content[MASK_KEY].to_torch_state_dict()["keep"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert train.content["config"]["server-round"] == 11
    torch.testing.assert_close(phases[2]["state"]["3.weight"], state["3.weight"] + 0.2)
    assert strategy.client_records(13, 1) == {}  # the mask does not outlive the defense


def test_bad_options_fail_with_the_key():
    with pytest.raises(ValueError, match="strategy.agg='max'"):
        FederatedPruningStrategy(agg="max")
    with pytest.raises(ValueError, match="strategy.rates"):
        FederatedPruningStrategy(rates=[0.1, 0.5])
    with pytest.raises(ValueError, match="strategy.adjust_stats"):
        FederatedPruningStrategy(adjust_stats="channel")


# ---- schedule=periodic: pruning events during training, the mask held between them ---------------------
def run_rounds(strategy, grid, state, rounds, before_round=None):
    """The ServerApp's round loop (configure_train -> send_and_receive -> aggregate_train) on a fake grid;
    returns the global state after every round and the round reports."""
    arrays, states, reports = ArrayRecord(state), {}, {}
    for server_round in range(1, rounds + 1):
        if before_round is not None:
            before_round(server_round)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        new_arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        arrays = new_arrays if new_arrays is not None else arrays
        states[server_round], reports[server_round] = arrays.to_torch_state_dict(), strategy.last_report
    return states, reports


def test_periodic_prunes_after_rounds_2_and_4_and_holds_the_mask(flower_task_identity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # mean activations order the channels 1, 3, 0, 2 (most dormant first)
    acts = {1: torch.tensor([0.5, 0.0, 2.0, 0.1]), 2: torch.tensor([0.6, 0.0, 1.0, 0.2])}
    grid = FakeGrid(acts, {1: [0.9, 0.9, 0.7], 2: [0.8, 0.79, 0.5]})  # rates 0, 0.25, 0.5: 0.25 within τ
    strategy = FederatedPruningStrategy(rates=[0.0, 0.25, 0.5], tolerance=0.02, finetune_rounds=1,
                                        schedule="periodic", every=2, num_rounds=5, min_available_nodes=2)
    sent_by_round: dict[int, int] = {}

    def before_round(server_round):
        sent_by_round[server_round] = len(grid.sent)
        if server_round == 3:
            # the second event: channel 1 now reports the highest activation (a stale or lying statistic)
            # and 0.5 is within τ; the held channel 1 must still come first and stay removed
            grid.acts = {1: torch.tensor([0.5, 9.0, 2.0, 0.1]), 2: torch.tensor([0.6, 9.0, 1.0, 0.2])}
            grid.accs = {1: [0.9, 0.9, 0.89], 2: [0.8, 0.8, 0.8]}

    states, reports = run_rounds(strategy, grid, state, 5, before_round)

    # queries go out after the aggregation of rounds 2 and 4 only (round 5 is left to post_train)
    kinds = [m.metadata.message_type for m in grid.sent]
    queries = [f"query.{ACTIVATIONS_ACTION}"] * 2 + [f"query.{ACCURACY_ACTION}"] * 2
    assert kinds == ["train"] * 4 + queries + ["train"] * 4 + queries + ["train"] * 2
    events = {r: rep.info for r, rep in reports.items() if "pruning_event" in rep.info}
    assert sorted(events) == [2, 4]
    assert events[2]["rate"] == 0.25 and events[2]["n_pruned"] == 1 and events[2]["sequence"][0] == 1
    assert events[4]["rate"] == 0.5 and events[4]["n_pruned"] == 2 and events[4]["n_newly_pruned"] == 1
    assert events[4]["sequence"][:2] == [1, 3]  # the held channel first, then the most dormant
    assert all(e["n_adjusted"] >= 0 and e["t_prune"] >= 0 and e["layer"] == "0" for e in events.values())

    # the mask is in the train messages of the rounds after an event, and in none before the first
    def masks_of(server_round):
        start = sent_by_round[server_round]
        train = [m for m in grid.sent[start:] if m.metadata.message_type == "train"][:2]
        assert all(m.content["config"]["server-round"] == server_round for m in train)
        return [m.content[MASK_KEY].to_torch_state_dict()["keep"].tolist() if MASK_KEY in m.content else None
                for m in train]

    assert masks_of(1) == masks_of(2) == [None, None]
    assert masks_of(3) == masks_of(4) == [[1.0, 0.0, 1.0, 1.0]] * 2
    assert masks_of(5) == [[1.0, 0.0, 1.0, 0.0]] * 2

    # the clients add 0.1 to every weight, removed channels included: the server zeroes them again
    for server_round, removed, kept in ((2, [1], [0, 2, 3]), (3, [1], [0, 2, 3]), (4, [1, 3], [0, 2]),
                                        (5, [1, 3], [0, 2])):
        s = states[server_round]
        assert torch.count_nonzero(s["0.weight"][removed]) == 0 and torch.count_nonzero(s["0.bias"][removed]) == 0
        assert torch.count_nonzero(s["0.weight"][kept]) > 0
    assert torch.count_nonzero(states[1]["0.weight"][[1, 3]]) > 0  # nothing removed before the first event
    assert reports[3].info["n_pruned_held"] == 1 and reports[5].info["n_pruned_held"] == 2
    # a linear layer after it is not touched: the plain FedAvg mean of (global + 0.1)
    torch.testing.assert_close(states[5]["3.weight"], state["3.weight"] + 0.5)

    # the final cleansing keeps what the events removed, even at a chosen rate of 0
    grid.accs = {1: [0.9, 0.5, 0.5], 2: [0.8, 0.5, 0.5]}
    strategy.post_train(grid, states[5], 5)
    prune = strategy.post_train_phases[1]
    assert prune["defense"]["rate"] == 0.0 and prune["defense"]["n_pruned"] == 2
    assert prune["defense"]["n_newly_pruned"] == 0
    for p in strategy.post_train_phases[1:]:
        assert torch.count_nonzero(p["state"]["0.weight"][[1, 3]]) == 0
    assert [m.metadata.message_type for m in grid.sent[-2:]] == ["train"] * 2  # the fine-tuning round 6
    assert grid.sent[-1].content[MASK_KEY].to_torch_state_dict()["keep"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert strategy.client_records(7, 1) == {}


def test_final_schedule_never_queries_during_training(flower_task_identity):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    grid = FakeGrid({1: torch.rand(4), 2: torch.rand(4)}, {1: [0.9, 0.9, 0.7], 2: [0.8, 0.79, 0.5]})
    strategy = FederatedPruningStrategy(rates=[0.0, 0.25, 0.5], every=2, num_rounds=5, min_available_nodes=2)
    _, reports = run_rounds(strategy, grid, model.state_dict(), 5)
    assert {m.metadata.message_type for m in grid.sent} == {"train"}
    assert all(not rep.info for rep in reports.values())


def test_periodic_leaves_the_last_round_to_the_final_cleansing(flower_task_identity):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    grid = FakeGrid({1: torch.rand(4), 2: torch.rand(4)}, {1: [0.9, 0.9, 0.7], 2: [0.8, 0.79, 0.5]})
    strategy = FederatedPruningStrategy(rates=[0.0, 0.25, 0.5], schedule="periodic", every=2, num_rounds=4,
                                        min_available_nodes=2)
    _, reports = run_rounds(strategy, grid, model.state_dict(), 4)  # round 4 is the last and a multiple of 2
    assert [r for r, rep in reports.items() if "pruning_event" in rep.info] == [2]
    assert [m.metadata.message_type for m in grid.sent][-4:] == ["train"] * 4  # rounds 3 and 4: no queries


def test_held_mask_survives_a_checkpoint(flower_task_identity):
    strategy = FederatedPruningStrategy(schedule="periodic", every=2, num_rounds=5)
    assert strategy.state_dict() == {"keep": None}
    strategy.keep = torch.tensor([True, False, True])
    resumed = FederatedPruningStrategy(schedule="periodic", every=2, num_rounds=5)
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.client_records(3, 1)[MASK_KEY].to_torch_state_dict()["keep"].tolist() == [1.0, 0.0, 1.0]


def test_bad_schedule_options_fail_with_the_key():
    with pytest.raises(ValueError, match="strategy.schedule='sometimes' is invalid; allowed: final, periodic"):
        FederatedPruningStrategy(schedule="sometimes")
    for every in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"strategy.every={every!r} is invalid; allowed: an integer >= 1"):
            FederatedPruningStrategy(schedule="periodic", every=every, num_rounds=10)
    with pytest.raises(ValueError, match="strategy.every=5 is invalid with num_rounds=5"):
        FederatedPruningStrategy(schedule="periodic", every=5, num_rounds=5)
    with pytest.raises(ValueError, match="strategy.num_rounds=None"):
        FederatedPruningStrategy(schedule="periodic", every=2)
    FederatedPruningStrategy(schedule="final", every=0)  # `every` means nothing without schedule=periodic


def test_bad_every_is_one_config_error_before_the_run():
    from server.app import check_run
    from task.config import ConfigError, compose_config

    with pytest.raises(ConfigError) as info:
        check_run(compose_config(["strategy=pruning", "strategy.schedule=periodic", "strategy.every=0"]))
    assert str(info.value).startswith("strategy=pruning: strategy.every=0 is invalid") and "\n" not in str(info.value)
    strategy = check_run(compose_config(["strategy=pruning", "strategy.schedule=periodic", "strategy.every=3",
                                         "num_rounds=7"]))
    assert (strategy.schedule, strategy.every, strategy.num_rounds) == ("periodic", 3, 7)  # num_rounds follows the run


# ---- the four phases through a real `flwr run` ------------------------------------------------------
@pytest.mark.slow
def test_flwr_run_writes_one_row_per_phase(tmp_path):
    from test_integration import read_rows, run, superlinks_of

    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "strategy=pruning",
                "model=cnn_3conv_2fc", "strategy.finetune_rounds=1", "strategy.rates=[0.0,0.25,0.5]"], home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows[:3]] == [0, 1, 2] and all("phase" not in r for r in rows[:3])
    phases = rows[3:]
    assert [r.get("phase") for r in phases] == ["train", "prune", "finetune", "adjust"]
    assert [r["round"] for r in phases] == [2, 2, 3, 3] and [r["phase_rounds"] for r in phases] == [2, 2, 1, 0]
    assert phases[0]["ma"] == rows[2]["ma"] and phases[0]["asr"] == rows[2]["asr"]
    prune = phases[1]["defense"]
    assert prune["layer"] == "conv3" and prune["rate"] in (0.0, 0.25, 0.5)
    assert len(prune["client_acc_curve"]) == 3 and all(0 <= a <= 1 for a in prune["client_acc_curve"])
    assert prune["n_pruned"] == int(prune["rate"] * 64) and sorted(prune["sequence"]) == list(range(64))
    assert 0 <= phases[3]["defense"]["share_adjusted"] < 0.05
    for r in phases:
        assert 0.0 <= r["ma"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["final_ma"] == phases[-1]["ma"]
    assert superlinks_of(home) == []
    assert np.isfinite(summary["wall_seconds"])


@pytest.mark.slow
def test_flwr_run_periodic_prunes_during_training(tmp_path):
    from test_integration import read_rows, run, superlinks_of

    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "num_rounds=3",
                "strategy=pruning", "model=cnn_3conv_2fc", "strategy.schedule=periodic", "strategy.every=1",
                "strategy.finetune_rounds=1", "strategy.rates=[0.0,0.25,0.5]"], home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows[:4]] == [0, 1, 2, 3] and all("phase" not in r for r in rows[:4])
    assert [r.get("phase") for r in rows[4:]] == ["train", "prune", "finetune", "adjust"]
    # events after rounds 1 and 2 (round 3, the last, is left to the final cleansing)
    first, second = rows[1]["defense"], rows[2]["defense"]
    assert first["pruning_event"] == second["pruning_event"] == "periodic" and "pruning_event" not in rows[3]["defense"]
    assert first["layer"] == "conv3" and first["rate"] in (0.0, 0.25, 0.5)
    assert first["n_pruned"] == int(first["rate"] * 64) and sorted(first["sequence"]) == list(range(64))
    # the mask only grows, and is held in round 3 and in the final cleansing
    assert first["n_pruned"] <= second["n_pruned"] == rows[3]["defense"]["n_pruned_held"]
    held = first["n_pruned"]  # the channels the first event removed lead the second event's sequence
    assert sorted(second["sequence"][:held]) == sorted(first["sequence"][:held])
    assert rows[5]["defense"]["n_pruned"] >= second["n_pruned"]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)  # the global model after round 3
    keep = checkpoint["strategy_state"]["keep"]
    assert int((~keep).sum()) == second["n_pruned"]
    assert torch.count_nonzero(checkpoint["global_state"]["conv3.weight"][~keep]) == 0
    for r in rows[1:]:
        assert 0.0 <= r["ma"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
    assert superlinks_of(home) == []
