"""Hydra sweeps over thorn experiments: every job goes through `flwr run` (server/launch.py).

    python -m server.sweep -m strategy=fedavg attack=badnets,none seed=0,1,2

Each job writes its run records into its Hydra job folder (multirun/<time>/<job number>/). When the
multirun ends, `SummaryTableCallback` writes one table of the final MA/ASR per job
(`summary_jobs.csv`) and per setting with mean ± std over seeds (`summary.csv`, `summary.md`)
into the sweep folder, and prints the Markdown table.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from server.launch import launch, local_superlink_pids, stop_pids
from task.config import ConfigError, check_group_names

CONF_PATH = str(Path(__file__).resolve().parent.parent / "conf")


def _read_job(job_dir: Path) -> dict[str, Any] | None:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.exists():
        return None
    from omegaconf import OmegaConf

    overrides = [str(o) for o in OmegaConf.load(overrides_file)]
    summary_file = job_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return {"job": job_dir.name, "overrides": overrides,
            "setting": " ".join(o for o in overrides if not o.startswith("seed=")) or "(defaults)",
            "seed": summary.get("seed"), "finished": bool(summary.get("finished")),
            "final_ma": summary.get("final_ma"), "final_asr": summary.get("final_asr"),
            "best_ma": summary.get("best_ma"), "wall_seconds": summary.get("wall_seconds"),
            "mean_tpr": summary.get("mean_tpr"), "mean_fpr": summary.get("mean_fpr"),
            "mean_malicious_weight": summary.get("mean_malicious_weight")}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_pct(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def summarise_sweep(sweep_dir: Path) -> str:
    """Write summary_jobs.csv, summary.csv and summary.md in `sweep_dir`; return the Markdown."""
    jobs = [j for d in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name))
            if d.is_dir() and (j := _read_job(d)) is not None]
    with open(sweep_dir / "summary_jobs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "setting", "seed", "finished", "final_ma", "final_asr",
                                               "best_ma", "wall_seconds", "mean_tpr", "mean_fpr",
                                               "mean_malicious_weight"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(jobs)
    settings: dict[str, list[dict]] = {}
    for job in jobs:
        settings.setdefault(job["setting"], []).append(job)
    rows = []
    for setting, group in settings.items():
        done = [j for j in group if j["finished"]]
        ma = [j["final_ma"] for j in done if j["final_ma"] is not None]
        asr = [j["final_asr"] for j in done if j["final_asr"] is not None]
        tpr = [j["mean_tpr"] for j in done if j.get("mean_tpr") is not None]
        fpr = [j["mean_fpr"] for j in done if j.get("mean_fpr") is not None]
        mal_weight = [j["mean_malicious_weight"] for j in done if j.get("mean_malicious_weight") is not None]
        rows.append({"setting": setting, "runs": len(done), "failed": len(group) - len(done),
                     "seeds": " ".join(str(j["seed"]) for j in done),
                     "ma_mean": mean_std(ma)[0] if ma else None, "ma_std": mean_std(ma)[1] if ma else None,
                     "asr_mean": mean_std(asr)[0] if asr else None, "asr_std": mean_std(asr)[1] if asr else None,
                     "ma": fmt_pct(ma), "asr": fmt_pct(asr), "tpr": fmt_pct(tpr), "fpr": fmt_pct(fpr),
                     "malicious_weight": fmt_pct(mal_weight)})
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["setting", "runs", "failed", "seeds", "ma_mean", "ma_std",
                                               "asr_mean", "asr_std", "tpr", "fpr", "malicious_weight"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    # detection columns (mean over rounds, then mean ± std over seeds) only when some defense reported them
    detection = any(r["tpr"] != "n/a" or r["malicious_weight"] != "n/a" for r in rows)
    head = "| setting | runs | seeds | final MA % (mean ± std) | final ASR % (mean ± std) |"
    rule = "|---|---|---|---|---|"
    if detection:
        head += " mean TPR % | mean FPR % | malicious weight % |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        line = f"| {r['setting']} | {r['runs']}{failed} | {r['seeds']} | {r['ma']} | {r['asr']} |"
        if detection:
            line += f" {r['tpr']} | {r['fpr']} | {r['malicious_weight']} |"
        lines.append(line)
    markdown = "\n".join(lines) + "\n"
    (sweep_dir / "summary.md").write_text(markdown)
    return markdown


class SummaryTableCallback(Callback):
    """Writes the sweep's summary table when a multirun ends; stops the local SuperLink it started."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._superlinks_before = local_superlink_pids()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        stop_pids(local_superlink_pids() - getattr(self, "_superlinks_before", set()))
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            markdown = summarise_sweep(sweep_dir)
            print(f"\nthorn sweep summary ({sweep_dir}/summary.md):\n\n{markdown}", flush=True)


@hydra.main(config_path=CONF_PATH, config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    code = launch(overrides, out_dir=out_dir, keep_superlink=multirun)
    if code != 0:
        print(f"thorn: job {out_dir} failed with exit code {code}", file=sys.stderr)
        if not multirun:
            sys.exit(code)
        return None
    return json.loads((out_dir / "summary.json").read_text()).get("final_asr")


def main() -> None:
    # Hydra's message for an unknown group option is a multi-line dump: check names first, in one line.
    try:
        check_group_names([a for a in sys.argv[1:] if not a.startswith("-")], Path(CONF_PATH))
    except ConfigError as exc:
        print(f"thorn: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_job()


if __name__ == "__main__":
    main()
