"""What does running through Flower cost? The same local training, two ways, side by side in one run.

(a) a plain PyTorch loop: for each round, every client object trains in turn in this process (the
    same BenignClient/MaliciousClient code, data, epochs and batch size), then the models are averaged;
(b) thorn: the same experiment through `flwr run` (simulation engine, Ray actors).

Printed: (b)'s start-up seconds (from `flwr run` until rounds run at steady speed: engine start, Ray
actors, data loading, the round-0 evaluation and the first round's extra cost), and the per-round
time of both after start-up (median over rounds 2..R) with the ratio (b)/(a).

    python bench/overhead.py                       # defaults: 10 clients, Fashion-MNIST, 5 rounds
    python bench/overhead.py --rounds 5 num_clients=10 local.epochs=2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from client.app import is_malicious  # noqa: E402
from client.clients import BenignClient, MaliciousClient  # noqa: E402
from server.launch import launch  # noqa: E402
from strategies.aggregation import weighted_average_states  # noqa: E402
from task.config import compose_config, resolve_device  # noqa: E402
from task.data import federated_data  # noqa: E402
from task.train import build_model, seed_everything  # noqa: E402


def plain_loop(overrides: list[str], rounds: int) -> list[float]:
    """Per-round seconds of the same training without Flower."""
    cfg = compose_config(overrides)
    data = federated_data(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, 0, 0)
    model = build_model(cfg, data.spec, data.num_classes)
    keys = list(model.state_dict())
    state = model.state_dict()
    poison = instantiate(cfg.attack.poison) if cfg.attack.poison is not None else None
    clients = [MaliciousClient(cfg, data, pid, device, keys, poison) if poison is not None
               and is_malicious(cfg, pid, {}) else BenignClient(cfg, data, pid, device, keys)
               for pid in range(cfg.num_clients)]
    seconds = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        params = [v.numpy() for v in state.values()]
        results = [c.fit(params, {"server-round": rnd}) for c in clients]
        states = [{k: torch.from_numpy(v) for k, v in zip(keys, r[0], strict=True)} for r in results]
        state = weighted_average_states(states, [r[1] for r in results])
        seconds.append(time.perf_counter() - t0)
        print(f"  plain loop round {rnd}: {seconds[-1]:.2f} s", flush=True)
    return seconds


def thorn_rounds(overrides: list[str], rounds: int) -> tuple[list[float], float]:
    """Per-round seconds through `flwr run`, and the start-up seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        t_launch = time.time()
        code = launch([*overrides, f"num_rounds={rounds}", f"eval_every={rounds}"], out_dir=Path(tmp) / "run")
        if code != 0:
            raise SystemExit(f"thorn run failed with exit code {code}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    seconds = [summary["round_seconds"][str(r)] for r in range(1, rounds + 1)]
    steady = statistics.median(seconds[1:])
    startup = (summary["first_round_started_at"] - t_launch) + (seconds[0] - steady)
    return seconds, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (round 1 carries the start-up)")
    print(f"(a) plain PyTorch loop, {args.rounds} rounds ...", flush=True)
    plain = plain_loop(args.overrides, args.rounds)
    print(f"(b) thorn through flwr run, {args.rounds} rounds ...", flush=True)
    thorn, startup = thorn_rounds(args.overrides, args.rounds)
    a, b = statistics.median(plain[1:]), statistics.median(thorn[1:])
    cfg = compose_config(args.overrides)
    figures = {"clients": cfg.num_clients, "dataset": cfg.dataset.name, "model": cfg.model.name,
               "epochs": cfg.local.epochs, "batch_size": cfg.local.batch_size, "rounds": args.rounds,
               "plain_round_s": a, "thorn_round_s": b, "ratio": b / a, "thorn_startup_s": startup,
               "cores": __import__("os").cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    print()
    print(f"setting: {cfg.num_clients} clients, {cfg.dataset.name}, {cfg.model.name}, {cfg.local.epochs} local "
          f"epoch(s), batch {cfg.local.batch_size}, {figures['cores']} CPU cores")
    print(f"per round after start-up (median of rounds 2..{args.rounds}): plain loop {a:.2f} s, thorn {b:.2f} s")
    print(f"ratio thorn / plain loop: {b / a:.2f}")
    print(f"thorn start-up: {startup:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
