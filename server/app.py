"""The thorn ServerApp (Flower Message API).

It composes the run's config from the run config (`overrides`, `config-name`, `out-dir`), checks it
before round 1, builds the model and the strategy (`_target_`), and drives the rounds itself: the
loop is Flower's `Strategy.start` (configure_train -> send_and_receive -> aggregate_train ->
central evaluation) plus what a study needs around it: per-round records, atomic checkpoints and
resume, a post-training phase, and the ground truth diverted away from the strategy.
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from server.evaluation import attack_success_rate, main_accuracy
from server.omniscient import OmniscientRewriter
from server.records import RunRecorder, load_checkpoint
from server.truth import TruthStrippingGrid
from strategies.base import PostTrainingDefense, ReplyLimits, ServerContext, ThornStrategy
from strategies.fip import Purifier, purification_enabled, sharpness_subset
from task.config import PROJECT_ROOT, ConfigError, compose_config, resolve_device
from task.data import federated_data
from task.models import trainable_state_keys
from task.partition import malicious_client_ids
from task.train import LocalTrainingConfig, build_model, seed_everything

app = ServerApp()


def resolve_out_dir(cfg: DictConfig, out_dir_override: str = "") -> Path:
    """`out-dir` from the run config, else `out_dir` from the Hydra config, else outputs/<time>-<strategy>-<attack>.

    Relative paths are taken from the project folder: under `flwr run` the app runs from an installed
    copy whose working directory is not the user's.
    """
    chosen = out_dir_override or cfg.out_dir
    if not chosen:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        chosen = f"outputs/{stamp}-{cfg.strategy.name}-{cfg.attack.name}"
    path = Path(chosen).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def build_strategy(cfg: DictConfig) -> ThornStrategy:
    from hydra.errors import InstantiationException

    params = {k: v for k, v in OmegaConf.to_container(cfg.strategy, resolve=True).items() if k != "name"}
    try:
        strategy = instantiate(params, fraction_train=float(cfg.fraction_train),
                               min_train_nodes=int(cfg.min_train_clients), min_available_nodes=int(cfg.num_clients))
    except InstantiationException as exc:
        # a constructor's ValueError names the bad key (e.g. strategy.every): one line, not Hydra's traceback
        if not isinstance(exc.__cause__, ValueError | TypeError):
            raise
        raise ConfigError(f"strategy={cfg.strategy.name}: {exc.__cause__}") from exc
    if not isinstance(strategy, ThornStrategy):
        raise ConfigError(f"strategy._target_={params.get('_target_')!r} is not a thorn strategy "
                          "(a subclass of strategies.base.ThornStrategy)")
    return strategy


def is_simulation(grid: Grid) -> bool:
    """The simulation engine hands the ServerApp an in-memory grid; a deployment an HTTP one."""
    return "InMemory" in type(grid).__name__


def wait_for_clients(grid: Grid, cfg: DictConfig) -> None:
    """Fail before round 1 when the federation does not have exactly num_clients SuperNodes."""
    hint = (f"set num_clients to the number of SuperNodes, or start {cfg.num_clients} SuperNodes "
            f"(simulation: --federation-config \"num-supernodes={cfg.num_clients}\")")
    # In simulation every SuperNode is registered before the ServerApp starts; in deployment they may
    # still be connecting, so poll for a while.
    deadline = time.time() + (2.0 if is_simulation(grid) else float(cfg.server.wait_for_clients_s))
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected == cfg.num_clients:
            return
        if connected > cfg.num_clients:
            raise ConfigError(f"num_clients={cfg.num_clients} but {connected} SuperNodes are connected; {hint}")
        if time.time() > deadline:
            raise ConfigError(f"num_clients={cfg.num_clients} but only {connected} SuperNodes are connected; {hint}")
        time.sleep(0.5)


def check_attack(cfg: DictConfig) -> None:
    """Build the attack's parts once, so a bad attack setting stops the run before round 1 in one line."""
    from hydra.errors import InstantiationException

    from attacks.schedule import AttackSchedule

    try:
        AttackSchedule(**OmegaConf.to_container(cfg.attack.schedule, resolve=True))
        for key in ("poison", "model_poison"):
            if cfg.attack.get(key) is not None:
                instantiate(cfg.attack[key])
        if cfg.attack.get("omniscient") is not None:
            # a dry run on zero updates with the expected attacker count (LIE's z needs enough attackers)
            num_malicious = len(malicious_client_ids(cfg.num_clients, float(cfg.attack.fraction),
                                                     cfg.attack.malicious_ids, cfg.seed))
            OmniscientRewriter.craft(instantiate(cfg.attack.omniscient, _partial_=True),
                                     torch.zeros(max(cfg.num_clients - num_malicious, 1), 3),
                                     num_clients=cfg.num_clients, num_malicious=num_malicious)
    except (ValueError, TypeError, InstantiationException) as exc:
        cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ else exc
        raise ConfigError(f"attack={cfg.attack.name}: {cause}") from exc


def clients_per_round(cfg: DictConfig) -> int:
    """How many clients FedAvg's sampling picks per round with this config."""
    return max(int(cfg.num_clients * float(cfg.fraction_train)), int(cfg.min_train_clients))


def check_run(cfg: DictConfig) -> ThornStrategy:
    """Everything the config alone decides, checked before any data is loaded or Flower is started
    (the launcher calls it too): the attack's parts, the strategy's preconditions, the server split a
    defense needs. Returns the built strategy."""
    check_attack(cfg)
    strategy = build_strategy(cfg)
    try:
        strategy.check_preconditions(clients_per_round(cfg))
    except ValueError as exc:
        raise ConfigError(f"strategy={cfg.strategy.name}: {exc}") from exc
    # the defense and the purification that run on the server's clean split need one
    for needs_split, who in ((strategy.needs_server_data, f"strategy={cfg.strategy.name}"),
                             (purification_enabled(cfg), f"purification={cfg.get('purification', {}).get('name')}")):
        if needs_split and float(cfg.server.val_fraction) == 0.0:
            raise ConfigError(f"{who} needs the server's clean split, but "
                              "server.val_fraction=0; allowed: 0 < server.val_fraction < 1")
    try:
        Purifier.from_run_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return strategy


def percent(value: float | None) -> str:
    return "  n/a " if value is None else f"{100 * value:6.2f}%"


def run_experiment(grid: Grid, cfg: DictConfig, out_dir: Path) -> dict:
    """Run every round of one experiment and write its records; returns the summary."""
    t_start = time.time()
    random.seed(cfg.seed)  # Flower samples clients with `random`
    np.random.seed(cfg.seed)
    strategy = check_run(cfg)
    if cfg.attack.get("omniscient") and not is_simulation(grid):
        raise ConfigError(f"attack={cfg.attack.name} is an omniscient attack: it needs the simulation engine "
                          "(no client can see the others' updates in a deployment)")
    wait_for_clients(grid, cfg)
    data = federated_data(cfg)
    device = resolve_device(cfg.device)
    poison = instantiate(cfg.attack.poison) if cfg.attack.poison is not None else None
    seed_everything(cfg.seed, 0, 0)  # the initial model is the same in every run with this seed
    model = build_model(cfg, data.spec, data.num_classes).to(device)
    strategy.trainable_keys = trainable_state_keys(model)
    strategy.reply_limits = ReplyLimits(
        max_update_norm=None if cfg.server.max_update_norm is None else float(cfg.server.max_update_norm),
        max_extra_bytes=None if cfg.server.max_extra_bytes is None else int(cfg.server.max_extra_bytes))
    if strategy.needs_server_data:
        x_val, y_val = data.server_data()
        strategy.server_context = ServerContext(
            x_val=x_val, y_val=y_val, spec=data.spec, device=device, seed=int(cfg.seed),
            build_model=lambda: build_model(cfg, data.spec, data.num_classes),
            local=LocalTrainingConfig.from_cfg(cfg.local))

    # ---- purification (conf/purification/, strategies/fip.py): after aggregation, with any strategy ----
    purifier = Purifier.from_run_config(cfg)
    if purifier is not None:
        purifier.attach(*data.server_data(), data.spec, device, sharpness_subset(
            data.test_x, data.test_y, purifier.config.lambda_samples, int(cfg.seed)))
    # ----
    checkpoint = load_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log(INFO, "[thorn] resume=true but %s has no checkpoint.pt: starting from round 1", out_dir)
    start_round = 1
    if checkpoint is not None:
        model.load_state_dict(checkpoint["global_state"])
        strategy.load_state_dict(checkpoint["strategy_state"])
        rng = checkpoint["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        start_round = int(checkpoint["round"]) + 1
        log(INFO, "[thorn] resuming %s after round %d", out_dir, start_round - 1)
    recorder = RunRecorder(out_dir, cfg, resume_from_round=start_round - 1)
    if checkpoint is not None:
        recorder.truth.update(checkpoint.get("truth", {}))
    rewriter = None
    if cfg.attack.get("omniscient"):
        rewriter = OmniscientRewriter(cfg.attack.name, instantiate(cfg.attack.omniscient, _partial_=True),
                                      trainable_state_keys(model), int(cfg.num_clients))
        recorder.omniscient = cfg.attack.name
    truth_grid = TruthStrippingGrid(grid, recorder.record_truth, rewrite_replies=rewriter)
    log(INFO, "[thorn] %s | %s vs %s | %d clients | %d rounds | %s engine (%s) | records in %s", cfg.dataset.name,
        cfg.strategy.name, cfg.attack.name, cfg.num_clients, cfg.num_rounds,
        "simulation" if is_simulation(grid) else "deployment", type(grid).__name__, out_dir)

    def evaluate(state_model) -> tuple[float, float | None]:
        ma = main_accuracy(state_model, data.test_x, data.test_y, data.spec, device, cfg.eval_batch_size)
        asr = (attack_success_rate(state_model, data.test_x, data.test_y, data.spec, device, poison,
                                   bool(cfg.asr.exclude_target), cfg.eval_batch_size) if poison else None)
        return ma, asr

    def evaluate_initial_model() -> None:
        ma, asr = evaluate(model)
        recorder.write_round({"round": 0, "ma": ma, "asr": asr})
        log(INFO, "[thorn] round %3d/%d | MA %s | ASR %s | initial model", 0, cfg.num_rounds, percent(ma),
            percent(asr))

    recorder.startup_seconds = time.time() - t_start
    recorder.first_round_started_at = time.time()
    arrays = ArrayRecord(model.state_dict())
    for server_round in range(start_round, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), truth_grid))
        # the initial model is evaluated while the clients train round 1 (it does not change meanwhile)
        replies = truth_grid.send_and_receive(messages, timeout=float(cfg.round_timeout),
                                              while_waiting=evaluate_initial_model if server_round == 1 else None)
        replies = list(replies)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        # a client that hung past round_timeout or vanished sent no reply at all: count it as failed
        missing_replies = max(len(messages) - len(replies), 0)
        if missing_replies and strategy.last_report is not None:
            strategy.last_report.failures += missing_replies
            log(WARNING, "round %d: %d client(s) sent no reply within round_timeout=%s s", server_round,
                missing_replies, cfg.round_timeout)
        if new_arrays is not None:
            arrays = new_arrays
        t_round = time.perf_counter() - t0
        recorder.round_seconds[server_round] = t_round
        global_state = arrays.to_torch_state_dict()
        if purifier is not None and purifier.due(server_round, cfg.num_rounds):  # ---- purification hook
            global_state, purify_row = purifier.purify_state(model, global_state, server_round, evaluate)
            arrays = ArrayRecord(global_state)
            recorder.write_round(purify_row)
            log(INFO, "[thorn] round %3d purified (%s) | MA %s -> %s | ASR %s -> %s | λ_max %.3g -> %.3g | %.1f s",
                server_round, purify_row["method"], percent(purify_row["ma_before"]), percent(purify_row["ma_after"]),
                percent(purify_row["asr_before"]), percent(purify_row["asr_after"]),
                purify_row["lambda_max_before"] or float("nan"), purify_row["lambda_max_after"] or float("nan"),
                purify_row["t_purify"])  # ----
        ma = asr = None
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds:
            model.load_state_dict(global_state)
            ma, asr = evaluate(model)
        report = strategy.last_report
        row = recorder.round_row(server_round, report, ma, asr, t_round)
        if rewriter is not None:
            row["omniscient_rewritten"] = rewriter.rewritten_last_round
        recorder.write_round(row)
        recorder.save_checkpoint(server_round, global_state, strategy.state_dict())
        recorder.write_summary(finished=False)
        loss = row.get("train_loss")
        log(INFO, "[thorn] round %3d/%d | MA %s | ASR %s | loss %s | %d clients%s | %.1f s", server_round,
            cfg.num_rounds, percent(ma), percent(asr), "  n/a " if loss is None else f"{loss:.4f}",
            row.get("n_clients", 0), " | SKIPPED" if row.get("skipped") else "", t_round)

    if isinstance(strategy, PostTrainingDefense):
        t0 = time.perf_counter()
        state = strategy.post_train(truth_grid, arrays.to_torch_state_dict(), cfg.num_rounds)
        # a multi-phase defense (strategies/pruning.py) lists the model after each phase: one row per phase
        for phase in strategy.post_train_phases:
            model.load_state_dict(phase["state"])
            ma, asr = evaluate(model)
            recorder.write_round({**{k: v for k, v in phase.items() if k != "state"}, "ma": ma, "asr": asr})
            log(INFO, "[thorn] post-training phase %-8s | MA %s | ASR %s", phase["phase"], percent(ma), percent(asr))
        if not strategy.post_train_phases:
            model.load_state_dict(state)
            ma, asr = evaluate(model)
            recorder.write_round({"round": cfg.num_rounds, "phase": "post_train", "ma": ma, "asr": asr,
                                  "t_round": time.perf_counter() - t0})
            log(INFO, "[thorn] post-training | MA %s | ASR %s", percent(ma), percent(asr))

    summary = recorder.write_summary(finished=True)
    log(INFO, "[thorn] done in %.1f s | final MA %s | final ASR %s | records: %s", summary["wall_seconds"],
        percent(summary["final_ma"]), percent(summary["final_asr"]), out_dir)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    try:
        cfg = compose_config(str(rc.get("overrides", "")), str(rc.get("config-name", "config")))
        out_dir = resolve_out_dir(cfg, str(rc.get("out-dir", "")))
        run_experiment(grid, cfg, out_dir)
    except ConfigError as exc:
        log(ERROR, "thorn: config error: %s", exc)
        raise SystemExit(2) from None
