"""Config composition and validation, shared by the ServerApp, the ClientApp and the sweep runner.

`conf/` is the single source of truth of a run. Both Flower apps receive only a Hydra override string
(`overrides` in the run config) and compose the same tree from it here, so a run is changed with
`flwr run . --run-config 'overrides="strategy=fedavg attack=badnets"'` without editing files.

A config that cannot work must fail before round 1 with ONE clear line naming the key, the value
and what is allowed: that is what `ConfigError` carries.
"""

from __future__ import annotations

import math
import shlex
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
CONFIG_GROUPS = ("dataset", "partition", "model", "attack", "strategy", "purification", "experiment")


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming key, value and what is allowed."""


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Names selectable for a config group (the yaml files of conf/<group>/)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def split_overrides(overrides: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Turn 'a=1 b="x y"' into ['a=1', 'b=x y'] (a list is passed through)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


def check_group_names(overrides: list[str], conf_dir: Path) -> None:
    # Hydra's own message for an unknown group option is a multi-line dump of the search path;
    # check the names first so the user gets one line with the allowed values.
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        is_group = key in CONFIG_GROUPS or ("/" in key and (conf_dir / key).is_dir())  # e.g. attack/model_poison
        if sep and is_group and value not in ("", "null"):
            allowed = group_options(key, conf_dir)
            for name in value.split(","):  # a sweep value list: strategy=fedavg,krum
                if name not in allowed:
                    raise ConfigError(f"{key}={name!r} is unknown; allowed values: {', '.join(allowed)}")


@lru_cache(maxsize=8)
def _compose_cached(overrides: tuple[str, ...], config_name: str, conf_dir: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_group_names(list(overrides), Path(conf_dir))
    # Inside a @hydra.main job (the sweep runner) Hydra is already initialised: step aside, then restore.
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="thorn"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:  # bad override syntax, unknown key, ...
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"invalid override in {' '.join(overrides)!r}: {first_line}") from exc
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def compose_config(
    overrides: str | list[str] | tuple[str, ...] | None = None,
    config_name: str = "config",
    conf_dir: Path = CONF_DIR,
    validate: bool = True,
) -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides; cached per process (read-only result)."""
    cfg = _compose_cached(tuple(split_overrides(overrides)), config_name, str(conf_dir))
    if validate:
        validate_config(cfg)
    return cfg


def _require(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


# classes per data set (for checking attack target labels before any data is loaded)
DATASET_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar10_lt": 10, "cifar100": 100,
                   "svhn": 10, "gtsrb": 43, "usps": 10}


def _int(key: str, value, low: int | None = None, high: int | None = None, allow_none: bool = False) -> None:
    """An integer (not a bool) in [low, high]."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    bounds = " and ".join(b for b in ((f">= {low}" if low is not None else ""),
                                      (f"<= {high}" if high is not None else "")) if b)
    _require(ok, key, value, ("null or " if allow_none else "") + "an integer" + (f" {bounds}" if bounds else ""))


def _number(key: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, allow_none: bool = False) -> None:
    """A finite number in the interval given (open or closed ends)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    bounds = f" {' and '.join(parts)}" if parts else ""
    _require(ok, key, value, ("null or " if allow_none else "") + "a number" + bounds)


def _bool(key: str, value) -> None:
    _require(isinstance(value, bool), key, value, "true or false")


def validate_config(cfg: DictConfig) -> None:
    """Check the values a run depends on before anything starts (types, ranges, names, combinations);
    raise ConfigError naming the key, the value and what is allowed, on the first bad one. Group
    options (strategy=, attack=, ...) are checked by name in `check_group_names`; a defense's own keys by
    its constructor and `check_preconditions` (server/app.py `check_run`), also before round 1."""
    _int("seed", cfg.seed, 0)
    _int("num_clients", cfg.num_clients, 1)
    _int("num_rounds", cfg.num_rounds, 1)
    _number("fraction_train", cfg.fraction_train, 0.0, 1.0, low_open=True)
    _int("min_train_clients", cfg.min_train_clients, 1, cfg.num_clients)
    _number("round_timeout", cfg.round_timeout, 0.0, low_open=True)
    _int("eval_every", cfg.eval_every, 1)
    _int("eval_batch_size", cfg.eval_batch_size, 1)
    _require(isinstance(cfg.device, str) and (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")),
             "device", cfg.device, "auto, cpu, cuda or cuda:<index>")
    _bool("resume", cfg.resume)
    _number("server.val_fraction", cfg.server.val_fraction, 0.0, 1.0, high_open=True)
    _number("server.wait_for_clients_s", cfg.server.wait_for_clients_s, 0.0)
    _number("server.max_update_norm", cfg.server.get("max_update_norm"), 0.0, low_open=True, allow_none=True)
    _int("server.max_extra_bytes", cfg.server.get("max_extra_bytes"), 0, allow_none=True)
    _int("local.epochs", cfg.local.epochs, 1)
    _int("local.batch_size", cfg.local.batch_size, 1)
    _number("local.lr", cfg.local.lr, 0.0, low_open=True)
    _number("local.momentum", cfg.local.momentum, 0.0, 1.0, high_open=True)
    _number("local.weight_decay", cfg.local.weight_decay, 0.0)
    _bool("asr.exclude_target", cfg.asr.exclude_target)
    _require(cfg.logger.wandb.mode in ("disabled", "offline", "online"), "logger.wandb.mode",
             cfg.logger.wandb.mode, "disabled, offline, online")
    _int("client_resources.num_cpus", cfg.client_resources.num_cpus, 1)
    _number("client_resources.num_gpus", cfg.client_resources.num_gpus, 0.0)
    for key in ("train_limit", "test_limit"):
        _int(f"dataset.{key}", cfg.dataset.get(key), 1, allow_none=True)
    _number("attack.fraction", cfg.attack.fraction, 0.0, 1.0)
    ids = cfg.attack.malicious_ids
    if ids is not None:
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < cfg.num_clients)]
        _require(not bad, "attack.malicious_ids", list(ids), f"client ids in 0..{cfg.num_clients - 1}")
    if cfg.attack.poison is not None:
        poison = cfg.attack.poison
        _number("attack.poison.poison_ratio", poison.poison_ratio, 0.0, 1.0)
        if "target_label" in poison:
            classes = DATASET_CLASSES.get(str(cfg.dataset.name))
            _int("attack.poison.target_label", poison.target_label, 0, None if classes is None else classes - 1)
    schedule = cfg.attack.get("schedule")
    if schedule is not None:
        _int("attack.schedule.start_round", schedule.start_round, 1)
        _int("attack.schedule.end_round", schedule.end_round, schedule.start_round
             if isinstance(schedule.start_round, int) else 1, allow_none=True)
        _int("attack.schedule.every", schedule.every, 1)
        _int("attack.schedule.per_round", schedule.per_round, 1, cfg.num_clients, allow_none=True)
    if cfg.partition.name == "dirichlet":
        _number("partition.alpha", cfg.partition.alpha, 0.0, low_open=True)
    if cfg.partition.name == "pathological":
        _int("partition.classes_per_client", cfg.partition.classes_per_client, 1)


def resolve_device(name: str):
    """'auto' -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
