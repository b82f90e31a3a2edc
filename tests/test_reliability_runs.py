"""Reliability through the real engine (`flwr run`, simulation): failing clients cost only their own
reply; a server killed with SIGKILL resumes from its checkpoint to the same final metrics as an
uninterrupted run; two runs with the same seed write the same metrics.jsonl apart from timing fields."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_integration import read_rows, run, thorn_env

from task.config import PROJECT_ROOT

TIMING_KEYS = {"t_round", "t_aggregate", "t_client_max", "t_client_sum"}
TESTS_CONF = Path(__file__).resolve().parent / "conf"


def without_timing(rows: list[dict]) -> list[str]:
    """Each row as canonical JSON without its wall-clock fields (what must be identical)."""
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING_KEYS}, sort_keys=True) for r in rows]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(p) for p in out]
    return children + [d for c in children for d in descendants(c)]


def superlink_pids(control_port: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*--control-api-address 127.0.0.1:{control_port} "],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.slow
def test_half_of_the_clients_failing_every_round_costs_only_their_replies(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), "experiment=smoke", "num_rounds=3",
                f"hydra.searchpath=[file://{TESTS_CONF}]", "+faults=half", "faults.mode=mixed"], home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(out)[1:]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:  # 2 of 4 clients fail each round: one crashes, one sends NaN weights
        assert r["n_failed"] == 1 and r["n_invalid"] == 1 and r["invalid_reasons"] == {"non-finite": 1}
        assert r["n_clients"] == 2 and not r["skipped"] and r["ma"] is not None
        assert math.isfinite(r["train_loss"])  # the NaN reply never reached the aggregate
    assert json.loads((out / "summary.json").read_text())["finished"]
    assert "injected fault" in proc.stdout + proc.stderr  # the crash and its reason are in the log


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_run_and_runs_are_deterministic(tmp_path):
    args = ["experiment=smoke", "num_rounds=4", "attack=badnets"]
    reference, again, killed = tmp_path / "reference", tmp_path / "again", tmp_path / "killed"
    for out in (reference, again):
        proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(out), *args], tmp_path / "home")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # determinism: same config and seed -> the same metrics.jsonl, byte for byte once timing is removed
    assert without_timing(read_rows(reference)) == without_timing(read_rows(again))

    env = thorn_env(tmp_path / "home-killed")
    launcher = subprocess.Popen([sys.executable, "-m", "server.launch", "--out-dir", str(killed), *args],
                                cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait until round 2 is recorded (and checkpointed), then crash
            if metrics.exists() and any(json.loads(line)["round"] == 2 for line in metrics.read_text().splitlines()
                                        if line.strip()):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached round 2")
        # SIGKILL the server side: the SuperLink and everything under it (the ServerApp's simulation
        # process, Ray), no chance to clean up; then the launcher
        victims = []
        for link in superlink_pids(env["FLWR_LOCAL_CONTROL_API_PORT"]):
            victims += [link, *descendants(link)]
        assert victims, "no SuperLink found for this run"
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait(timeout=60)
    crashed_rows = read_rows(killed)
    assert crashed_rows[-1]["round"] < 4, "the run finished before it was killed"
    assert not json.loads((killed / "summary.json").read_text())["finished"]

    proc = run([sys.executable, "-m", "server.launch", "--out-dir", str(killed), *args, "resume=true"],
               tmp_path / "home-resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(killed)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # no round lost, none duplicated
    assert without_timing(rows) == without_timing(read_rows(reference))
    assert json.loads((killed / "summary.json").read_text())["final_ma"] == read_rows(reference)[-1]["ma"]
