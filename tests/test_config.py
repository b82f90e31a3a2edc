"""Config composition, `_target_` instantiation and the one-line config errors."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf.errors import ReadonlyConfigError

from attacks.badnets import BadNets
from server.app import build_strategy
from strategies.fedavg import FedAvgStrategy
from task.config import ConfigError, compose_config, group_options
from task.data import InputSpec
from task.models import LeNet, SimpleCNN
from task.train import build_model


def test_defaults_compose_to_the_documented_experiment():
    cfg = compose_config()
    assert (cfg.dataset.name, cfg.partition.name, cfg.model.name) == ("fashion_mnist", "dirichlet", "lenet")
    assert (cfg.attack.name, cfg.strategy.name) == ("badnets", "fedavg")
    assert cfg.num_clients == 10 and cfg.partition.alpha == 0.5 and cfg.attack.fraction == 0.3
    assert cfg.attack.poison.target_label == 2 and cfg.attack.poison.poison_ratio == 0.5
    assert cfg.logger.wandb.mode == "disabled" and cfg.asr.exclude_target is True


def test_every_group_option_composes():
    for group in ("dataset", "partition", "model", "attack", "strategy"):
        for name in group_options(group):
            cfg = compose_config([f"{group}={name}"])
            assert cfg[group].name == name


def test_experiment_preset_overrides_the_primary_config():
    cfg = compose_config("experiment=smoke")
    assert cfg.num_clients == 4 and cfg.num_rounds == 2 and cfg.dataset.train_limit == 2000
    # a command-line override still wins over the preset
    assert compose_config("experiment=smoke num_rounds=3").num_rounds == 3


def test_targets_instantiate_the_named_classes():
    cfg = compose_config("model=simple_cnn attack=badnets strategy=fedavg")
    assert isinstance(instantiate(cfg.attack.poison), BadNets)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FedAvgStrategy) and strategy.min_available_nodes == cfg.num_clients
    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=cfg.model.input_size, channels=cfg.model.input_channels)
    assert isinstance(build_model(cfg, spec, 10), SimpleCNN)
    lenet = build_model(compose_config(), InputSpec((0.5,), (0.5,), 28, 1), 10)
    assert isinstance(lenet, LeNet) and lenet(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("override, key", [
    ("strategy=nosuch", "strategy='nosuch' is unknown; allowed values: "),
    ("attack=nosuch", "attack='nosuch' is unknown; allowed values: badnets, "),
    ("num_clients=0", "num_clients=0 is invalid"),
    ("fraction_train=1.5", "fraction_train=1.5 is invalid"),
    ("partition.alpha=-1", "partition.alpha=-1 is invalid"),
    ("attack.malicious_ids=[12]", "attack.malicious_ids=[12] is invalid; allowed: client ids in 0..9"),
    ("logger.wandb.mode=cloud", "logger.wandb.mode='cloud' is invalid"),
    ("nosuchkey=3", "Could not override 'nosuchkey'"),
    ("local.lr=abc", "local.lr='abc' is invalid; allowed: a number > 0"),
    ("local.momentum=1.5", "local.momentum=1.5 is invalid; allowed: a number >= 0 and < 1"),
    ("round_timeout=0", "round_timeout=0 is invalid"),
    ("seed=1.5", "seed=1.5 is invalid; allowed: an integer >= 0"),
    ("resume=maybe", "resume='maybe' is invalid; allowed: true or false"),
    ("attack.poison.target_label=10", "attack.poison.target_label=10 is invalid; allowed: an integer >= 0 and <= 9"),
    ("attack.schedule.end_round=0", "attack.schedule.end_round=0 is invalid"),
    ("server.max_update_norm=-1", "server.max_update_norm=-1 is invalid; allowed: null or a number > 0"),
    ("min_train_clients=11", "min_train_clients=11 is invalid; allowed: an integer >= 1 and <= 10"),
])
def test_bad_config_fails_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        compose_config(override)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_composed_config_is_read_only():
    cfg = compose_config()
    with pytest.raises(ReadonlyConfigError):
        cfg.num_rounds = 3
