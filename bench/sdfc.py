"""What does SDFC cost per round? FedAvg and SDFC on the same experiment, side by side in one run.

Both go through `flwr run` (simulation engine) with the same config and seed; the only difference is
`strategy=`. SDFC's extra work: every client computes its local Fisher once more per round (a pass
over its data; twice in round 1), the server computes the Fisher of every uploaded model on its clean
split, and the regulariser adds a term to every training step.

Printed: per-round seconds of both (median over rounds 2..R; round 1 carries start-up and SDFC's
bootstrap), their ratio SDFC / FedAvg, and SDFC's mean server aggregation time.

    python bench/sdfc.py                                   # experiment=sdfc_cpu, 4 rounds
    python bench/sdfc.py --rounds 5 experiment=sdfc_cpu attack=dba
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from server.launch import launch  # noqa: E402
from task.config import compose_config  # noqa: E402


def run_rounds(overrides: list[str], rounds: int) -> tuple[list[float], list[float]]:
    """Per-round seconds and per-round aggregation seconds of one run through `flwr run`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        code = launch([*overrides, f"num_rounds={rounds}", f"eval_every={rounds}"], out_dir=out)
        if code != 0:
            raise SystemExit(f"run {' '.join(overrides)} failed with exit code {code}")
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [summary["round_seconds"][str(r)] for r in range(1, rounds + 1)]
    aggregate = [r["t_aggregate"] for r in rows if r.get("t_aggregate") is not None]
    return seconds, aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", default=["experiment=sdfc_cpu"])
    args = parser.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (round 1 carries the start-up)")
    overrides = [o for o in args.overrides if not o.startswith("strategy=")]
    print(f"FedAvg, {args.rounds} rounds ...", flush=True)
    fedavg, fedavg_agg = run_rounds([*overrides, "strategy=fedavg"], args.rounds)
    print(f"SDFC, {args.rounds} rounds ...", flush=True)
    sdfc, sdfc_agg = run_rounds([*overrides, "strategy=sdfc"], args.rounds)
    a, b = statistics.median(fedavg[1:]), statistics.median(sdfc[1:])
    cfg = compose_config([*overrides, "strategy=sdfc"])
    figures = {"overrides": overrides, "clients": cfg.num_clients, "dataset": cfg.dataset.name,
               "model": cfg.model.name, "epochs": cfg.local.epochs, "rounds": args.rounds,
               "fedavg_round_s": a, "sdfc_round_s": b, "ratio": b / a,
               "fedavg_aggregate_s": statistics.fmean(fedavg_agg), "sdfc_aggregate_s": statistics.fmean(sdfc_agg),
               "fedavg_rounds_s": fedavg, "sdfc_rounds_s": sdfc, "cores": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version()}
    print()
    print(f"setting: {' '.join(overrides)}: {cfg.num_clients} clients, {cfg.dataset.name}, {cfg.model.name}, "
          f"{cfg.local.epochs} local epoch(s), {figures['cores']} CPU cores")
    print(f"per round (median of rounds 2..{args.rounds}): FedAvg {a:.2f} s, SDFC {b:.2f} s")
    print(f"ratio SDFC / FedAvg: {b / a:.2f}")
    print(f"server aggregation per round (mean): FedAvg {figures['fedavg_aggregate_s']:.3f} s, "
          f"SDFC {figures['sdfc_aggregate_s']:.3f} s (Fisher of every uploaded model on the clean split)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
