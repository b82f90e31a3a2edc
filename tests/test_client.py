"""Benign and malicious NumPyClients on a tiny on-disk data set, and who decides to be malicious."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from client.app import is_malicious, node_config_bool
from client.clients import BenignClient, MaliciousClient
from task.config import ConfigError, compose_config
from task.data import federated_data
from task.train import build_model, seed_everything


@pytest.fixture
def setup(tiny_idx_root):
    cfg = compose_config(["num_clients=3", f"dataset.root={tiny_idx_root}", "local.epochs=1", "local.batch_size=16"])
    data = federated_data(cfg)
    seed_everything(0)
    model = build_model(cfg, data.spec, data.num_classes)
    keys = list(model.state_dict())
    params = [v.numpy() for v in model.state_dict().values()]
    return cfg, data, keys, params


def test_benign_fit_returns_trained_parameters_and_counts(setup):
    cfg, data, keys, params = setup
    client = BenignClient(cfg, data, 0, torch.device("cpu"), keys)
    new, n, metrics = client.fit(params, {"server-round": 1})
    assert n == len(data.client_indices[0])
    assert [p.shape for p in new] == [p.shape for p in params]
    assert any(not np.allclose(a, b) for a, b in zip(new, params, strict=True))
    assert metrics["train-loss"] > 0 and metrics["train-seconds"] >= 0
    # same seed, round and client: the same update
    again, _, _ = BenignClient(cfg, data, 0, torch.device("cpu"), keys).fit(params, {"server-round": 1})
    assert all(np.array_equal(a, b) for a, b in zip(new, again, strict=True))


def test_malicious_client_poisons_its_batches(setup):
    cfg, data, keys, params = setup
    poison = instantiate(cfg.attack.poison)
    client = MaliciousClient(cfg, data, 1, torch.device("cpu"), keys, poison)
    seen = []
    hook = client.batch_hook()
    x = torch.rand(20, 1, 28, 28) * 0.5
    y = torch.zeros(20, dtype=torch.long)
    px, py = hook(x, y, torch.Generator().manual_seed(0))
    seen.append(int((py == poison.target_label).sum()))
    assert seen == [10]  # poison_ratio 0.5 of the batch is relabelled to the target
    triggered = py == poison.target_label
    assert torch.all(px[triggered][:, :, 24:27, 24:27] == 1.0)
    new, _, _ = client.fit(params, {"server-round": 1})
    benign, _, _ = BenignClient(cfg, data, 1, torch.device("cpu"), keys).fit(params, {"server-round": 1})
    assert any(not np.allclose(a, b) for a, b in zip(new, benign, strict=True))
    assert client.attacked and client.in_attacker_pool and not BenignClient.in_attacker_pool


def test_who_is_malicious():
    cfg = compose_config("attack.malicious_ids=[1,2]")
    assert [is_malicious(cfg, i, {}) for i in range(4)] == [False, True, True, False]
    # a deployment node's own config wins over the run config
    assert is_malicious(cfg, 0, {"malicious": True}) and not is_malicious(cfg, 1, {"malicious": "false"})
    drawn = compose_config()  # fraction 0.3 of 10 clients, seeded
    assert sum(is_malicious(drawn, i, {}) for i in range(10)) == 3
    none = compose_config("attack=none")
    assert not any(is_malicious(none, i, {}) for i in range(10))
    with pytest.raises(ConfigError):
        node_config_bool("maybe")


def test_malicious_client_attacks_only_in_its_schedule_rounds(setup):
    from attacks.schedule import AttackSchedule

    cfg, data, keys, params = setup
    poison = instantiate(cfg.attack.poison)
    client = MaliciousClient(cfg, data, 1, torch.device("cpu"), keys, poison,
                             schedule=AttackSchedule(start_round=2, end_round=2), pool=frozenset({1}))
    benign = BenignClient(cfg, data, 1, torch.device("cpu"), keys)
    out1, _, _ = client.fit(params, {"server-round": 1})
    assert not client.attacked
    assert all(np.array_equal(a, b) for a, b in zip(out1, benign.fit(params, {"server-round": 1})[0], strict=True))
    client.fit(params, {"server-round": 2})
    assert client.attacked


def test_attack_memory_persists_in_context_state(setup):
    from flwr.app import Context, RecordDict

    from client.app import MEMORY_KEY, load_memory, save_memory

    cfg, data, keys, params = setup
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client = MaliciousClient(cfg, data, 1, torch.device("cpu"), keys, None, memory=load_memory(context))
    client.memory["previous_global"] = torch.arange(4.0)
    save_memory(context, client)
    assert MEMORY_KEY in context.state
    assert torch.equal(load_memory(context)["previous_global"], torch.arange(4.0))
