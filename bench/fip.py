"""Purification time of FIP and Fast FIP, side by side in one process, and the Fast-FIP speed ratio.

    python bench/fip.py                                   # a LeNet backdoored here (Fashion-MNIST, BadNets)
    python bench/fip.py --checkpoint RUN_DIR --repeats 3  # a saved FedAvg global model (config.yaml next to it)

Both variants run the same loss (B1: CE + η_F·TrF + η_r·retainer) on the same clean subset (`--val-size`),
each with its own iteration count and lr as configured (`--iterations`, `--fast-iterations`); runs alternate
and the median of `--repeats` is reported, so load on a shared machine hits both alike. λ_max is not timed.
Nothing here is asserted: it prints the times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from strategies.fip import FIPConfig, purify  # noqa: E402
from task.config import compose_config  # noqa: E402
from task.data import federated_data  # noqa: E402
from task.train import LocalTrainingConfig, build_model, seed_everything, train_local  # noqa: E402


def backdoored_model(checkpoint: str | None):
    """(model, data, run config): a saved global model, or a LeNet trained here on 6000 images with BadNets."""
    if checkpoint:
        path = Path(checkpoint)
        ckpt = path / "checkpoint.pt" if path.is_dir() else path
        cfg = OmegaConf.load(ckpt.parent / "config.yaml")
        data = federated_data(cfg)
        model = build_model(cfg, data.spec, data.num_classes)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["global_state"])
        return model, data, cfg
    cfg = compose_config("attack=badnets dataset.train_limit=12000")
    data = federated_data(cfg)
    generator = seed_everything(cfg.seed, 1)
    model = build_model(cfg, data.spec, data.num_classes)
    poison = instantiate(cfg.attack.poison)
    x, y = data.train_x[data.pool_indices[:6000]], data.train_y[data.pool_indices[:6000]]
    train_local(model, x, y, data.spec, LocalTrainingConfig(epochs=2, lr=0.05, batch_size=64, momentum=0.9),
                torch.device("cpu"), generator,
                batch_hook=lambda xb, yb, g: _poison_share(poison, xb, yb, g))
    return model, data, cfg


def _poison_share(poison, xb, yb, generator):
    # a tenth of every batch triggered and relabelled (the FIP paper's 10 % poison rate)
    n = max(1, len(yb) // 10)
    xb, yb = xb.clone(), yb.clone()
    xb[:n], yb[:n] = poison.apply_trigger(xb[:n]), poison.target_label
    return xb, yb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--val-size", type=int, default=600)
    parser.add_argument("--iterations", type=int, default=200, help="FIP iterations")
    parser.add_argument("--fast-iterations", type=int, default=None, help="Fast FIP iterations (default: same)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, data, _ = backdoored_model(args.checkpoint)
    x_val, y_val = data.server_data()
    base = dict(val_size=args.val_size, lambda_iterations=0)
    variants = {
        "FIP": FIPConfig(**base, iterations=args.iterations),
        "Fast FIP": FIPConfig(**base, fast=True, iterations=args.fast_iterations or args.iterations),
    }
    seconds = {name: [] for name in variants}
    stats = {}
    for _ in range(args.repeats):
        for name, cfg in variants.items():  # alternate, so load changes hit both
            _, stats[name] = purify(model, x_val, y_val, data.spec, cfg)
            seconds[name].append(stats[name]["seconds"])
    print(f"model {type(model).__name__}, {stats['FIP']['n_val']} clean samples, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    for name in variants:
        s = statistics.median(seconds[name])
        it = stats[name]["iterations"]
        print(f"{name:9s} {s:7.2f} s  {it:5d} iterations  {1000 * s / it:7.1f} ms/iteration  "
              f"{stats[name]['trained_parameters']:8d} trained parameters")
    ratio = statistics.median(seconds["FIP"]) / statistics.median(seconds["Fast FIP"])
    per_it = ((statistics.median(seconds["FIP"]) / stats["FIP"]["iterations"])
              / (statistics.median(seconds["Fast FIP"]) / stats["Fast FIP"]["iterations"]))
    print(f"Fast-FIP speed ratio: {ratio:.2f}x overall, {per_it:.2f}x per iteration")


if __name__ == "__main__":
    main()
