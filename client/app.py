"""The thorn ClientApp (Flower Message API).

Each handler composes the run's config from the run config (cached per process), builds a
`BenignClient` or `MaliciousClient` for this node and calls it. Every train reply carries a `truth`
ConfigRecord (`is-malicious`, `partition-id`) that only the server's run recorder reads.

Who is malicious: in deployment, the node's `--node-config malicious=true|false` decides; otherwise
`attack.malicious_ids`, or a seeded draw of `attack.fraction` of the clients.
"""

from __future__ import annotations

import random
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from attacks.schedule import AttackSchedule, attacker_index
from client.clients import BenignClient, MaliciousClient
from task.config import ConfigError, compose_config, resolve_device
from task.data import federated_data
from task.partition import malicious_client_ids

app = ClientApp()
MEMORY_KEY = "attack-memory"  # context.state record of a malicious client's per-round memory
# `query.<action>` messages the defenses' client halves answer (Flower routes each action by name,
# so every action a ClientHalf declares in `query_actions` must be listed here).
DEFENSE_QUERY_ACTIONS: tuple[str, ...] = (
    "pruning_activations", "pruning_accuracy",  # strategies/pruning.py
)


def node_config_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"node config malicious={value!r} is invalid; allowed: true, false")


def run_config_of(context: Context) -> DictConfig:
    rc = context.run_config
    return compose_config(str(rc.get("overrides", "")), str(rc.get("config-name", "config")))


def attacker_pool(cfg: DictConfig, partition_id: int, node_config) -> frozenset[int] | None:
    """The attacker pool as this client knows it; None when this client is benign.

    In deployment a node only knows itself (`--node-config malicious=true`); in simulation every
    client derives the same pool from the config (explicit ids or a seeded draw)."""
    if "malicious" in node_config:  # deployment: the node's own configuration wins
        return frozenset({partition_id}) if node_config_bool(node_config["malicious"]) else None
    pool = malicious_client_ids(cfg.num_clients, float(cfg.attack.fraction), cfg.attack.malicious_ids, cfg.seed)
    return pool if partition_id in pool else None


def is_malicious(cfg: DictConfig, partition_id: int, node_config) -> bool:
    return attacker_pool(cfg, partition_id, node_config) is not None


def make_client(cfg: DictConfig, context: Context, state_keys: list[str]) -> BenignClient:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", cfg.num_clients))
    if num_partitions != cfg.num_clients:
        raise ConfigError(f"num_clients={cfg.num_clients} but this node says num-partitions={num_partitions}; "
                          "they must match")
    if not 0 <= partition_id < cfg.num_clients:
        raise ConfigError(f"partition-id={partition_id} is invalid; allowed: 0..{cfg.num_clients - 1}")
    data = federated_data(cfg)
    device = resolve_device(cfg.device)
    pool = attacker_pool(cfg, partition_id, context.node_config)
    if pool is None:
        return BenignClient(cfg, data, partition_id, device, state_keys)
    poison = instantiate(cfg.attack.poison) if cfg.attack.poison is not None else None
    if poison is not None:
        poison = poison.for_attacker(attacker_index(partition_id, pool))
    model_poison = instantiate(cfg.attack.model_poison) if cfg.attack.get("model_poison") else None
    schedule = AttackSchedule(**OmegaConf.to_container(cfg.attack.schedule, resolve=True))
    return MaliciousClient(cfg, data, partition_id, device, state_keys, poison, model_poison, schedule, pool,
                           memory=load_memory(context))


def client_half_of(cfg: DictConfig):
    """The strategy's ClientHalf class (strategies/base.py), or None for server-only defenses."""
    return getattr(get_class(cfg.strategy._target_), "client_half", None)


def attach_defense(cfg: DictConfig, context: Context, client: BenignClient):
    half_class = client_half_of(cfg)
    client.defense = half_class(context.state, client) if half_class is not None else None
    return client.defense


def load_memory(context: Context) -> dict[str, torch.Tensor]:
    record = context.state.get(MEMORY_KEY)
    return dict(record.to_torch_state_dict()) if record is not None else {}


def save_memory(context: Context, client: BenignClient) -> None:
    memory = getattr(client, "memory", None)
    if memory:
        context.state[MEMORY_KEY] = ArrayRecord({k: v.detach().cpu() for k, v in memory.items()})


def _truth(client: BenignClient) -> ConfigRecord:
    # `is-malicious`: did this client attack in this round (what detection is scored against);
    # `in-pool`: is it one of the attackers at all.
    return ConfigRecord({"is-malicious": bool(client.attacked), "in-pool": bool(client.in_attacker_pool),
                         "partition-id": int(client.partition_id)})


def injected_fault(cfg: DictConfig, partition_id: int, server_round: int) -> str | None:
    """TEST-ONLY: the fault this client simulates in this round (tests/conf/faults/), else None.

    The `faults` group exists only under tests/conf, so a normal run never has it."""
    faults = cfg.get("faults")
    if not faults:
        return None
    count = round(float(faults.fraction) * cfg.num_clients)
    failing = random.Random(f"{cfg.seed}-faults-{server_round}").sample(range(cfg.num_clients), count)
    if partition_id not in failing:
        return None
    if faults.mode == "mixed":  # alternate between a crash and a garbage reply
        return ("raise", "garbage")[failing.index(partition_id) % 2]
    return str(faults.mode)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = run_config_of(context)
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    server_round = int(config.get("server-round", 0))
    fault = injected_fault(cfg, int(context.node_config["partition-id"]), server_round)
    if fault == "raise":
        raise RuntimeError("injected fault (tests/conf/faults): this client crashes in this round")
    if fault == "hang":
        time.sleep(float(cfg.faults.hang_s))
    arrays = msg.content["arrays"]
    state = arrays.to_torch_state_dict()
    keys = list(state.keys())
    client = make_client(cfg, context, keys)
    parameters_in = [v.numpy() for v in state.values()]
    defense = attach_defense(cfg, context, client)
    if defense is not None:
        client.set_parameters(parameters_in)
        defense.before_training(msg.content, server_round)
    parameters, num_examples, metrics = client.fit(parameters_in, config)
    save_memory(context, client)
    new_state = {k: torch.from_numpy(v) for k, v in zip(keys, parameters, strict=True)}
    if fault == "garbage":
        new_state = {k: torch.full_like(v, float("nan")) if torch.is_floating_point(v) else v
                     for k, v in new_state.items()}
    extra = defense.after_training(client.model) if defense is not None else {}
    reply = RecordDict({
        **extra,
        "arrays": ArrayRecord(new_state),
        "metrics": MetricRecord({**metrics, "num-examples": int(num_examples)}),
        "truth": _truth(client),
    })
    return Message(reply, reply_to=msg)


def defense_query(msg: Message, context: Context) -> Message:
    """`query.<action>`: the strategy's client half answers (e.g. activation statistics for pruning)."""
    cfg = run_config_of(context)
    action = msg.metadata.message_type.split(".", 1)[1]
    state = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else None
    client = make_client(cfg, context, list(state.keys()) if state is not None else [])
    if state is not None:
        client.set_parameters([v.numpy() for v in state.values()])
    defense = attach_defense(cfg, context, client)
    if defense is None or action not in defense.query_actions:
        raise ConfigError(f"strategy={cfg.strategy.name} answers no query '{action}'")
    return Message(defense.query(action, msg.content), reply_to=msg)


for _action in DEFENSE_QUERY_ACTIONS:
    app.query(_action)(defense_query)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = run_config_of(context)
    state = msg.content["arrays"].to_torch_state_dict()
    client = make_client(cfg, context, list(state.keys()))
    loss, num_examples, metrics = client.evaluate([v.numpy() for v in state.values()], {})
    reply = RecordDict({"metrics": MetricRecord({"eval-loss": float(loss), **metrics,
                                                 "num-examples": int(num_examples)})})
    return Message(reply, reply_to=msg)
