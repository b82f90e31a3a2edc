"""The run recorder: config.yaml, metrics.jsonl, summary.json, curves.png, checkpoint.pt, wandb.

It is the only place that joins what a strategy decided (its RoundReport) with the ground truth
diverted from the replies (server/truth.py), to count detection TP/FP/TN/FN and the aggregation weight
mass on malicious clients. The formats are a contract other tools rely on (DESIGN.md).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from strategies.base import RoundReport

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def detection_counts(examined: list[int], rejected: set[int], truth: dict[int, bool]) -> dict[str, int] | None:
    """TP/FP/TN/FN of "rejected" against "malicious" over the examined nodes with known truth."""
    known = [n for n in examined if n in truth]
    if not known:
        return None
    tp = sum(1 for n in known if n in rejected and truth[n])
    fp = sum(1 for n in known if n in rejected and not truth[n])
    fn = sum(1 for n in known if n not in rejected and truth[n])
    tn = len(known) - tp - fp - fn
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def rates(det: dict[str, int] | None) -> tuple[float | None, float | None]:
    if det is None:
        return None, None
    tpr = det["tp"] / (det["tp"] + det["fn"]) if det["tp"] + det["fn"] else None
    fpr = det["fp"] / (det["fp"] + det["tn"]) if det["fp"] + det["tn"] else None
    return tpr, fpr


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunRecorder:
    def __init__(self, out_dir: Path, cfg: DictConfig, resume_from_round: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.truth: dict[int, bool] = {}          # node id -> is malicious (latest train reply)
        self.partition: dict[int, int] = {}       # node id -> partition id (node ids change between runs)
        self.rows: list[dict] = []
        self.t_start = time.time()
        self.round_seconds: dict[int, float] = {}
        self.startup_seconds: float | None = None
        self.first_round_started_at: float | None = None  # epoch seconds (bench/overhead.py reads it)
        self.omniscient: str | None = None  # name of the simulation-only omniscient attack wrapper, if any
        (self.out_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        metrics_path = self.out_dir / METRICS_FILE
        if resume_from_round > 0 and metrics_path.exists():
            # keep the rounds the checkpoint covers, drop any written after it (no duplicates on resume)
            for line in metrics_path.read_text().splitlines():
                if line.strip() and json.loads(line)["round"] <= resume_from_round:
                    self.rows.append(json.loads(line))
            atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
            prev = self._read_summary()
            self.round_seconds = {int(k): v for k, v in prev.get("round_seconds", {}).items()
                                  if int(k) <= resume_from_round}
        else:
            metrics_path.write_text("")
        self.wandb_run = self._init_wandb()

    def _read_summary(self) -> dict:
        path = self.out_dir / SUMMARY_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _init_wandb(self):
        mode = self.cfg.logger.wandb.mode
        if mode == "disabled":
            return None
        import wandb

        return wandb.init(project=self.cfg.logger.wandb.project, entity=self.cfg.logger.wandb.entity, mode=mode,
                          dir=str(self.out_dir), config=OmegaConf.to_container(self.cfg, resolve=True),
                          name=self.out_dir.name, resume="allow", id=self.out_dir.name.replace(" ", "-"))

    # called by TruthStrippingGrid for every reply that carried a truth record
    def record_truth(self, node_id: int, message_type: str, truth: dict) -> None:
        if message_type.startswith("train") and "is-malicious" in truth:
            self.truth[node_id] = bool(truth["is-malicious"])
            if "partition-id" in truth:
                self.partition[node_id] = int(truth["partition-id"])

    def round_row(self, server_round: int, report: RoundReport | None, ma: float | None, asr: float | None,
                  t_round: float) -> dict:
        row: dict[str, Any] = {"round": server_round, "ma": ma, "asr": asr}
        if report is None:
            return row
        truth = self.truth
        examined = report.node_ids
        # detection is scored only for defenses that reject clients (FedAvg "detecting nothing" is no figure)
        det = detection_counts(examined, set(report.rejected), truth) if report.filtering else None
        tpr, fpr = rates(det)
        known_weights = {n: w for n, w in report.weights.items() if n in truth}
        row.update({
            "train_loss": report.train_loss,
            "n_clients": len(examined),
            "n_malicious": sum(1 for n in examined if truth.get(n, False)),
            "n_failed": report.failures,
            "n_invalid": len(report.invalid),
            "invalid_reasons": dict(sorted(report.invalid_kinds.items())),
            "skipped": report.skipped,
            "detection": det,
            "tpr": tpr,
            "fpr": fpr,
            "malicious_weight": (sum(w for n, w in known_weights.items() if truth[n]) if known_weights else None),
            "t_round": t_round,
            "t_aggregate": report.t_aggregate,
            "t_client_max": max(report.client_seconds) if report.client_seconds else None,
            "t_client_sum": sum(report.client_seconds) if report.client_seconds else None,
        })
        if report.info:
            row["defense"] = report.info
        if report.weights or report.client_info:
            # per client (by partition id: node ids are random per run): ground truth, aggregation weight,
            # defense scores; the evidence for why a defense did (not) work
            order = sorted(examined, key=lambda n: (self.partition.get(n, 1 << 62), n))
            row["clients"] = [{"client": self.partition.get(n), "malicious": truth.get(n),
                               "weight": report.weights.get(n), **report.client_info.get(n, {})} for n in order]
        return row

    def write_round(self, row: dict) -> None:
        row = _clean(row)
        self.rows.append(row)
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            flat = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            self.wandb_run.log(flat, step=row["round"])
        self.plot_curves()

    def plot_curves(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.get("ma") is not None]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        rounds = [r["round"] for r in rows]
        ax.plot(rounds, [100 * r["ma"] for r in rows], marker="o", label="MA (clean accuracy)")
        if any(r.get("asr") is not None for r in rows):
            ax.plot(rounds, [100 * r["asr"] if r.get("asr") is not None else float("nan") for r in rows],
                    marker="s", label="ASR (attack success)")
        ax.set_xlabel("round")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
        ax.set_title(f"{self.cfg.strategy.name} vs {self.cfg.attack.name} on {self.cfg.dataset.name}")
        fig.tight_layout()
        tmp = self.out_dir / (CURVES_FILE + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.out_dir / CURVES_FILE)

    def write_summary(self, finished: bool) -> dict:
        evaluated = [r for r in self.rows if r.get("ma") is not None]
        final = evaluated[-1] if evaluated else {}
        asr_rows = [r for r in evaluated if r.get("asr") is not None]

        def round_mean(key: str) -> float | None:
            # mean over the rounds where the figure exists (rounds without a malicious/benign reply have no TPR/FPR)
            values = [r[key] for r in self.rows if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        summary = {
            "finished": finished,
            "rounds": self.rows[-1]["round"] if self.rows else 0,
            "final_round": final.get("round"),
            "final_ma": final.get("ma"),
            "final_asr": final.get("asr"),
            "best_ma": max((r["ma"] for r in evaluated), default=None),
            "best_asr": max((r["asr"] for r in asr_rows), default=None),
            "min_asr": min((r["asr"] for r in asr_rows), default=None),
            "mean_tpr": round_mean("tpr"),
            "mean_fpr": round_mean("fpr"),
            "mean_malicious_weight": round_mean("malicious_weight"),
            "wall_seconds": time.time() - self.t_start,
            "startup_seconds": self.startup_seconds,
            "first_round_started_at": self.first_round_started_at,
            "round_seconds": {str(k): v for k, v in sorted(self.round_seconds.items())},
            "seed": self.cfg.seed,
            "strategy": self.cfg.strategy.name,
            "attack": self.cfg.attack.name,
            "dataset": self.cfg.dataset.name,
            "omniscient_wrapper": (f"{self.omniscient} (simulation-only server-side wrapper)"
                                   if self.omniscient else None),
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        atomic_write_bytes(self.out_dir / SUMMARY_FILE, json.dumps(_clean(summary), indent=2).encode())
        if finished and self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
            self.wandb_run.finish()
        return summary

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, global_state: dict, strategy_state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({
            "round": server_round,
            "global_state": global_state,
            "strategy_state": strategy_state,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "truth": self.truth,
        }, buffer)
        atomic_write_bytes(self.out_dir / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(out_dir: Path) -> dict | None:
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
