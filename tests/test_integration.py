"""Integration: the real Flower engine through `flwr run` (simulation), small.

Each test gets its own FLWR_HOME, so the managed local SuperLink it starts is its own; the launcher
stops it by PID, and the tests check that nothing is left running.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server.sweep import summarise_sweep
from task.config import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thorn_env(flwr_home: Path) -> dict[str, str]:
    # A private FLWR_HOME does not isolate the managed local SuperLink's ports: without free ports of
    # its own, `flwr run` would hand the run to any SuperLink already listening on the default 39091.
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def superlinks_of(flwr_home: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    return out.stdout.split()


def run(cmd: list[str], flwr_home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=thorn_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout)


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_flwr_run_four_supernodes_two_rounds_writes_the_records(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke"], home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["n_clients"] == 4 and row["n_malicious"] == 1  # round(0.3 * 4) malicious, seen via truth
        assert row["detection"] is None and row["tpr"] is None  # FedAvg rejects nobody: no detection figures
        assert 0.0 < row["malicious_weight"] < 1.0
        assert 0.0 <= row["ma"] <= 1.0 and 0.0 <= row["asr"] <= 1.0 and row["train_loss"] > 0
        assert row["t_round"] > 0 and row["t_aggregate"] >= 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["final_ma"] == rows[-1]["ma"] and summary["rounds"] == 2
    assert (out / "config.yaml").exists() and (out / "curves.png").exists() and (out / "checkpoint.pt").exists()
    assert "[thorn] round   2/2" in proc.stdout + proc.stderr  # one readable line per round
    assert superlinks_of(home) == []


@pytest.mark.slow
def test_num_clients_must_match_the_supernodes(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    run_config = tmp_path / "rc.toml"
    run_config.write_text(f'overrides = "experiment=smoke"\nout-dir = "{out}"\n')
    try:
        proc = run(["flwr", "run", str(PROJECT_ROOT), "--stream", "--run-config", str(run_config),
                    "--federation-config", "num-supernodes=3"], home)
    finally:
        for pid in superlinks_of(home):
            os.kill(int(pid), 15)
    log = proc.stdout + proc.stderr
    lines = [line for line in log.splitlines() if "config error" in line]
    assert len(lines) == 1 and "num_clients=4 but only 3 SuperNodes are connected" in lines[0]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_unknown_strategy_stops_before_flower_starts(tmp_path):
    proc = run([sys.executable, "-m", "server.launch", "strategy=nosuch"], tmp_path / "home", timeout=60)
    assert proc.returncode == 2
    from task.config import group_options

    allowed = ", ".join(group_options("strategy"))
    assert proc.stderr.strip() == f"thorn: config error: strategy='nosuch' is unknown; allowed values: {allowed}"


@pytest.mark.slow
def test_sweep_runs_each_job_through_flwr_and_writes_one_table(tmp_path):
    home, sweep_dir = tmp_path / "flwr-home", tmp_path / "sweep"
    proc = run([sys.executable, "-m", "server.sweep", "-m", "seed=0,1", "experiment=smoke", "num_rounds=1",
                f"hydra.sweep.dir={sweep_dir}"], home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep_dir / job / "summary.json").read_text())["finished"]
    seeds = {json.loads((sweep_dir / j / "summary.json").read_text())["seed"] for j in ("0", "1")}
    assert seeds == {0, 1}
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert len(table) == 3 and "experiment=smoke num_rounds=1" in table[2] and "| 2 | 0 1 |" in table[2]
    assert superlinks_of(home) == []


def test_summarise_sweep_groups_seeds(tmp_path):
    def job(num: int, seed: int, strategy: str, ma: float, asr: float, tpr: float | None = None) -> None:
        d = tmp_path / str(num)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- strategy={strategy}\n- seed={seed}\n")
        (d / "summary.json").write_text(json.dumps({"finished": True, "seed": seed, "final_ma": ma,
                                                    "final_asr": asr, "mean_tpr": tpr, "mean_fpr": None}))

    job(0, 0, "fedavg", 0.80, 0.90)
    job(1, 1, "fedavg", 0.90, 1.00)
    job(2, 0, "other", 0.50, 0.10, tpr=0.75)
    markdown = summarise_sweep(tmp_path)
    # a defense that filters gets detection columns; one that does not shows n/a there
    assert "| strategy=fedavg | 2 | 0 1 | 85.00 ± 7.07 | 95.00 ± 7.07 | n/a | n/a | n/a |" in markdown
    assert "| strategy=other | 1 | 0 | 50.00 ± 0.00 | 10.00 ± 0.00 | 75.00 ± 0.00 | n/a | n/a |" in markdown
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_without_duplicating_rounds(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    first = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "num_rounds=1"],
                home)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    one_round = read_rows(out)
    second = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "num_rounds=2",
                  "resume=true"], home)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[:2] == one_round  # the rounds before the checkpoint are kept as they were
    assert "resuming" in second.stdout + second.stderr
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("overrides, check", [
    (["strategy=median", "attack=ipm"], "omniscient"),
    (["strategy=flame", "attack=dba"], "detection"),
])
def test_attacks_and_defenses_run_through_flower(tmp_path, overrides, check):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", *overrides], home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)[1:]
    summary = json.loads((out / "summary.json").read_text())
    if check == "omniscient":
        # the simulation-only wrapper rewrote exactly the attacking clients, and says so
        assert all(r["omniscient_rewritten"] == r["n_malicious"] == 1 for r in rows)
        assert summary["omniscient_wrapper"] == "ipm (simulation-only server-side wrapper)"
        assert summary["final_asr"] is None  # untargeted: no trigger, no ASR
        assert "SIMULATION-ONLY" in proc.stdout + proc.stderr
    else:
        for r in rows:  # FLAME filters: detection counts over all 4 clients, 1 of them malicious
            det = r["detection"]
            assert sum(det.values()) == 4 and det["tp"] + det["fn"] == 1
        assert summary["omniscient_wrapper"] is None and summary["final_asr"] is not None


@pytest.mark.parametrize("overrides, message", [
    (["strategy=bulyan", "strategy.num_malicious=3"],
     "strategy=bulyan: strategy.num_malicious=3 needs n >= 4f + 3 = 15 clients per round"),
    (["strategy=fltrust", "server.val_fraction=0"], "strategy=fltrust needs the server's clean split"),
    (["attack=lie", "experiment=smoke"], "attack=lie: LIE: z"),
])
def test_config_only_errors_stop_before_flower_starts(tmp_path, overrides, message):
    proc = run([sys.executable, "-m", "server.launch", *overrides], tmp_path / "home", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "flwr run" not in proc.stdout


@pytest.mark.slow
def test_sdfc_runs_through_flower_with_its_client_half(tmp_path):
    """SDFC end to end: clients upload a local Fisher, the server weights them, the records show it."""
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "strategy=sdfc",
                "strategy.val_subset=128"], home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)[1:]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["n_clients"] == 4 and r["n_invalid"] == 0 and not r["skipped"]
        weights = [c["weight"] for c in r["clients"]]
        scores = [c["sdfc_score"] for c in r["clients"]]
        assert sum(weights) == pytest.approx(1.0)
        assert max(weights) / min(weights) <= math.e + 1e-9
        # the lowest Fisher difference weighs most: SDFC's weights follow its scores
        assert weights[scores.index(min(scores))] == max(weights)
        assert r["malicious_weight"] == pytest.approx(sum(c["weight"] for c in r["clients"] if c["malicious"]))
