"""Config composition and validation, shared by the ServerApp, the ClientApp and the sweep runner.

`conf/` is the single source of truth of a run. Both Flower apps receive only a Hydra override string
(`overrides` in the run config) and compose the same tree from it here, so a run is changed with
`flwr run . --run-config 'overrides="strategy=fedavg attack=badnets"'` without editing files.

A config that cannot work must fail before round 1 with ONE clear line naming the key, the value
and what is allowed: that is what `ConfigError` carries.
"""

from __future__ import annotations

import shlex
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
CONFIG_GROUPS = ("dataset", "partition", "model", "attack", "strategy", "experiment")


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


def validate_config(cfg: DictConfig) -> None:
    """Check the values a run depends on before anything starts; raise ConfigError on the first bad one."""
    _require(isinstance(cfg.num_clients, int) and cfg.num_clients >= 1, "num_clients", cfg.num_clients,
             "an integer >= 1")
    _require(isinstance(cfg.num_rounds, int) and cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds,
             "an integer >= 1")
    _require(0.0 < float(cfg.fraction_train) <= 1.0, "fraction_train", cfg.fraction_train, "0 < value <= 1")
    _require(isinstance(cfg.eval_every, int) and cfg.eval_every >= 1, "eval_every", cfg.eval_every,
             "an integer >= 1")
    _require(cfg.device in ("auto", "cpu") or str(cfg.device).startswith("cuda"), "device", cfg.device,
             "auto, cpu, cuda or cuda:<index>")
    _require(0.0 <= float(cfg.server.val_fraction) < 1.0, "server.val_fraction", cfg.server.val_fraction,
             "0 <= value < 1")
    for key in ("epochs", "batch_size"):
        value = cfg.local[key]
        _require(isinstance(value, int) and value >= 1, f"local.{key}", value, "an integer >= 1")
    _require(float(cfg.local.lr) > 0, "local.lr", cfg.local.lr, "a number > 0")
    _require(cfg.logger.wandb.mode in ("disabled", "offline", "online"), "logger.wandb.mode",
             cfg.logger.wandb.mode, "disabled, offline, online")
    _require(0.0 <= float(cfg.attack.fraction) <= 1.0, "attack.fraction", cfg.attack.fraction, "0 <= value <= 1")
    ids = cfg.attack.malicious_ids
    if ids is not None:
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < cfg.num_clients)]
        _require(not bad, "attack.malicious_ids", list(ids), f"client ids in 0..{cfg.num_clients - 1}")
    if cfg.attack.poison is not None:
        poison = cfg.attack.poison
        _require(0.0 <= float(poison.poison_ratio) <= 1.0, "attack.poison.poison_ratio", poison.poison_ratio,
                 "0 <= value <= 1")
    if cfg.partition.name == "dirichlet":
        _require(float(cfg.partition.alpha) > 0, "partition.alpha", cfg.partition.alpha, "a number > 0")
    if cfg.partition.name == "pathological":
        _require(int(cfg.partition.classes_per_client) >= 1, "partition.classes_per_client",
                 cfg.partition.classes_per_client, "an integer >= 1")
    _require(1 <= int(cfg.min_train_clients) <= cfg.num_clients, "min_train_clients", cfg.min_train_clients,
             f"1..num_clients ({cfg.num_clients})")


def resolve_device(name: str):
    """'auto' -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
