"""Who got the weight? Per round, a defense's weights and scores for malicious vs benign clients.

Reads the `clients` entries of `metrics.jsonl` (ground truth, aggregation weight and the defense's own
per-client score, e.g. SDFC's Fisher-difference score `sdfc_score`) of one run folder or of every run
folder of a sweep, and prints per round the mean weight of a malicious and of a benign client and the
mean score of each group (with the uniform weight 1/n for comparison).

    python bench/client_weights.py multirun/<time>/3                 # one run
    python bench/client_weights.py multirun/<time> --strategy sdfc   # every run of a sweep with that strategy
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def runs_in(folder: Path, strategy: str | None, attack: str | None) -> list[Path]:
    candidates = [folder] if (folder / "metrics.jsonl").exists() else sorted(
        (d for d in folder.iterdir() if (d / "metrics.jsonl").exists()), key=lambda d: (len(d.name), d.name))
    picked = []
    for run in candidates:
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        if strategy and summary.get("strategy") != strategy:
            continue
        if attack and summary.get("attack") != attack:
            continue
        picked.append(run)
    return picked


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def per_round(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        clients = row.get("clients")
        if not clients:
            continue
        score_key = next((k for k in clients[0] if k not in ("client", "malicious", "weight")), None)
        groups = {True: [c for c in clients if c["malicious"]], False: [c for c in clients if not c["malicious"]]}
        out.append({
            "round": row["round"], "n": len(clients), "score_key": score_key,
            "w_mal": mean([c["weight"] for c in groups[True] if c["weight"] is not None]),
            "w_ben": mean([c["weight"] for c in groups[False] if c["weight"] is not None]),
            "s_mal": mean([c[score_key] for c in groups[True]]) if score_key else None,
            "s_ben": mean([c[score_key] for c in groups[False]]) if score_key else None,
            "mass": row.get("malicious_weight"), "ma": row.get("ma"), "asr": row.get("asr"),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--strategy", default=None)
    parser.add_argument("--attack", default=None)
    args = parser.parse_args()
    runs = runs_in(args.folder, args.strategy, args.attack)
    if not runs:
        raise SystemExit(f"no run with per-client records under {args.folder}")
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        rows = per_round(run)
        if not rows:
            continue
        key = rows[0]["score_key"] or "score"
        print(f"\n{run}: {summary['strategy']} vs {summary['attack']}, seed {summary['seed']}")
        print(f"{'round':>5} {'1/n':>6} {'w(mal)':>8} {'w(benign)':>10} {'mass(mal)':>10} "
              f"{key + '(mal)':>16} {key + '(benign)':>18} {'MA':>7} {'ASR':>7}")
        for r in rows:
            print(f"{r['round']:>5} {1 / r['n']:>6.3f} {fmt(r['w_mal']):>8} {fmt(r['w_ben']):>10} "
                  f"{fmt(r['mass']):>10} {fmt(r['s_mal'], '{:.4g}'):>16} {fmt(r['s_ben'], '{:.4g}'):>18} "
                  f"{fmt(r['ma'] and 100 * r['ma'], '{:.2f}'):>7} {fmt(r['asr'] and 100 * r['asr'], '{:.2f}'):>7}")


if __name__ == "__main__":
    main()
