"""Run thorn on Flower's real deployment engine, natively on this machine (127.0.0.1).

    python -m server.deploy local --nodes 3 --malicious 0 experiment=smoke num_rounds=2
    python -m server.deploy local --nodes 3 --malicious 0,2 --insecure strategy=fedavg attack=badnets
    python -m server.deploy local --nodes 3 --serve        # start the federation, wait for Ctrl-C

What `local` starts (every process in its own session, with its own FLWR_HOME and a log file in the
run folder):

- a SuperLink (`--isolation process`) on a free loopback port: Fleet, Control and Runtime API on one port;
- a `flower-superexec` that runs the ServerApps (`flwr-serverapp`) of that SuperLink;
- N SuperNodes (`--isolation process`, `--node-config "partition-id=i num-partitions=N malicious=..."`),
  each with its own `flower-superexec` that runs its ClientApps (`flwr-clientapp`, one per message).

TLS with SuperNode authentication is the default: a CA and a server certificate (SAN 127.0.0.1,
localhost, ::1) made with `openssl`, an ECDSA P-384 OpenSSH key pair per SuperNode made with
`ssh-keygen`, the SuperLink started with `--ssl-*` and `--enable-supernode-auth`, each public key
registered with `flwr supernode register` before its node starts. `--insecure` turns all of it off.

The experiment then runs through `python -m server.launch --connection <name> --out-dir <dir>`, i.e.
`flwr run <project> <name> --stream`: the same ServerApp/ClientApp code as in simulation, with the
same records (metrics.jsonl, summary.json, ...). Every started process is stopped by its PID at the
end (SIGTERM, then SIGKILL after a timeout), also on an error, Ctrl-C or SIGTERM.

From Python (what the tests use):

    with start_deployment(num_nodes=3, malicious={0}, tls=True) as dep:
        code = dep.run_experiment(["experiment=smoke", "num_clients=3"], out_dir)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from server.launch import FLWR_ENV, signal_pids
from task.config import PROJECT_ROOT

BIN_DIR = Path(sys.executable).parent  # the flwr CLIs of this environment
DEFAULT_CONNECTION = "thorn-local"
UNREGISTERED_KEY_ERROR = "No SuperNode found with the given public key"


class DeploymentError(RuntimeError):
    """A process of the deployment failed to start or to become ready (the message names its log)."""


# --------------------------------------------------------------------------------------------- helpers


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports on `host` (bound to port 0 together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def base_environment() -> dict[str, str]:
    env = {**os.environ, **FLWR_ENV, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_tool(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeploymentError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


@dataclass
class Credentials:
    """TLS material of the SuperLink and the SuperNodes' key pairs (private key; public = `<key>.pub`)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)


def generate_tls_certificates(out_dir: Path, dns_names: Sequence[str] = ("localhost",),
                              ip_addresses: Sequence[str] = ("127.0.0.1", "::1"), days: int = 365,
                              ) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signs (ECDSA P-384) -> (ca.crt, server.pem, server.key)."""
    if shutil.which("openssl") is None:
        raise DeploymentError("TLS needs `openssl` on PATH (or run with --insecure)")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = out_dir / "ca.key", out_dir / "ca.crt"
    key, csr, pem = out_dir / "server.key", out_dir / "server.csr", out_dir / "server.pem"
    ext = out_dir / "server.ext"
    san = ",".join([f"DNS:{d}" for d in dns_names] + [f"IP:{ip}" for ip in ip_addresses])
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes"]
    _run_tool(["openssl", "req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", str(days),
               "-sha384", "-subj", "/O=thorn/CN=thorn local CA"])
    _run_tool(["openssl", "req", "-new", *curve, "-keyout", str(key), "-out", str(csr),
               "-subj", f"/O=thorn/CN={dns_names[0] if dns_names else 'superlink'}"])
    _run_tool(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
               "-CAcreateserial", "-out", str(pem), "-days", str(days), "-sha384", "-extfile", str(ext)])
    for path in (ca_key, key):
        path.chmod(0o600)
    return ca_crt, pem, key


def generate_supernode_key(private_key: Path) -> Path:
    """An ECDSA P-384 OpenSSH key pair for SuperNode authentication; returns the private key's path."""
    if shutil.which("ssh-keygen") is None:
        raise DeploymentError("SuperNode authentication needs `ssh-keygen` on PATH (or run with --insecure)")
    private_key.parent.mkdir(parents=True, exist_ok=True)
    for path in (private_key, private_key.with_name(private_key.name + ".pub")):
        path.unlink(missing_ok=True)
    _run_tool(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", private_key.stem,
               "-f", str(private_key)])
    return private_key


def public_key_of(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Add `[superlink.<name>]` to `<flwr_home>/config.toml` (TLS with the CA bundle, or insecure)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = flwr_home / "config.toml"
    text = config.read_text() if config.exists() else ""
    if f"[superlink.{name}]" in text:
        raise DeploymentError(f"{config} already has a connection named {name!r}")
    lines = [f"[superlink.{name}]", f"address = {json.dumps(address)}"]
    lines.append(f"root-certificates = {json.dumps(str(root_certificates))}" if root_certificates
                 else "insecure = true")
    config.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "\n".join(lines) + "\n")
    return config


def session_members(session_ids: Iterable[int]) -> set[int]:
    """PIDs of live (not zombie) processes whose session is one of `session_ids` (Linux /proc)."""
    wanted, found = set(session_ids), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) in wanted:
            found.add(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """True while /proc/<pid> exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


# --------------------------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """One started process: its own session (so its children can be found and stopped), its log."""

    name: str
    cmd: list[str]
    popen: subprocess.Popen
    log: Path
    port: int | None = None  # a SuperNode's Runtime API port
    essential: bool = True   # part of the federation: its exit is an error (not so for `flwr run`, probes)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_text()[-chars:]


def stop_processes(procs: Sequence[ManagedProcess], timeout: float = 10.0) -> None:
    """SIGTERM every process and what it spawned (its session), SIGKILL what is left after `timeout`."""
    sessions = {p.pid for p in procs}
    targets = {p.pid for p in procs if p.running()} | session_members(sessions)
    signal_pids(targets, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            p.popen.poll()  # reap our children, else they linger as zombies
        targets = {pid for pid in targets | session_members(sessions) if pid_alive(pid)}
        if not targets:
            break
        time.sleep(0.2)
    signal_pids(targets | session_members(sessions), signal.SIGKILL)
    for p in procs:
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------------------------- deployment


class Deployment:
    """A SuperLink, its ServerApp executor, and SuperNodes with their ClientApp executors, on 127.0.0.1.

    Use `start_deployment(...)`; as a context manager it stops every process on exit.
    """

    def __init__(self, run_dir: Path, tls: bool = True, connection: str = DEFAULT_CONNECTION,
                 host: str = "127.0.0.1", certs_dir: Path | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.tls = tls
        # certs_dir: reuse docker/gen-certs.sh's layout (certificates/{ca.crt,server.pem,server.key},
        # keys/supernode-<i>) instead of making fresh material in the run folder
        self.certs_dir = Path(certs_dir).resolve() if certs_dir else None
        self.connection = connection
        self.host = host
        self.logs = self.run_dir / "logs"
        self.homes = self.run_dir / "flwr-home"
        self.cli_home = self.homes / "cli"  # FLWR_HOME of the flwr CLI: holds the connection
        self.processes: list[ManagedProcess] = []
        self.credentials: Credentials | None = None
        self.superlink_port: int | None = None
        self.num_partitions = 0
        self._stopped = False
        self._lock = threading.Lock()
        self.logs.mkdir(parents=True, exist_ok=True)

    # ---- bookkeeping
    @property
    def address(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    @property
    def pids(self) -> list[int]:
        """PIDs of every process this deployment started (stopped or not)."""
        return [p.pid for p in self.processes]

    def environment(self, home: str) -> dict[str, str]:
        flwr_home = self.homes / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {**base_environment(), "FLWR_HOME": str(flwr_home)}

    def cli_environment(self) -> dict[str, str]:
        return self.environment("cli")

    def spawn(self, name: str, cmd: list[str], home: str | None = None, cwd: Path | None = None,
              env: dict[str, str] | None = None, essential: bool = True) -> ManagedProcess:
        log = self.logs / f"{name}.log"
        with self._lock:
            if self._stopped:
                raise DeploymentError("the deployment is stopped")
            with log.open("ab") as out:
                out.write(f"$ {' '.join(cmd)}\n".encode())
                out.flush()
                popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=cwd or self.run_dir, env=env or self.environment(home or name),
                                         start_new_session=True)
            proc = ManagedProcess(name, cmd, popen, log, essential=essential)
            self.processes.append(proc)
            self._write_pid_file()
        return proc

    def _write_pid_file(self) -> None:
        (self.run_dir / "pids.json").write_text(json.dumps({p.name: p.pid for p in self.processes}, indent=1) + "\n")

    def _failed(self, proc: ManagedProcess, what: str) -> DeploymentError:
        state = f"exited with code {proc.popen.returncode}" if not proc.running() else "is still running"
        return DeploymentError(f"{proc.name} {what} ({state}); log {proc.log}:\n{proc.log_tail(1500)}")

    # ---- the flwr CLI
    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `flwr <args>` with the deployment's CLI home; output appended to logs/flwr-cli.log."""
        cmd = [str(BIN_DIR / "flwr"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.run_dir,
                              env=self.cli_environment())
        with (self.logs / "flwr-cli.log").open("a") as log:
            log.write(f"$ {' '.join(cmd)}  -> {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
        return proc

    def list_nodes(self) -> list[dict]:
        """`flwr supernode list <connection> --format json` -> the nodes (status: registered, online, ...)."""
        proc = self.flwr("supernode", "list", self.connection, "--format", "json")
        try:
            data = json.loads(proc.stdout[proc.stdout.find("{"):])
        except ValueError:
            return []
        return data.get("nodes", []) if data.get("success") else []

    # ---- starting
    def start_superlink(self, timeout: float = 60.0) -> ManagedProcess:
        self.superlink_port = free_ports(1, self.host)[0]
        cmd = [str(BIN_DIR / "flower-superlink"), "--isolation", "process", "--host", self.host,
               "--port", str(self.superlink_port), "--disable-runtime-dependency-installation"]
        if self.tls:
            if self.credentials is None and self.certs_dir is not None:
                found = [self.certs_dir / "certificates" / f for f in ("ca.crt", "server.pem", "server.key")]
                missing = [str(f) for f in found if not f.is_file()]
                if missing:
                    raise DeploymentError(f"--certs-dir lacks {', '.join(missing)} "
                                          "(make them with docker/gen-certs.sh)")
                self.credentials = Credentials(*found)
            self.credentials = creds = self.credentials or Credentials(
                *generate_tls_certificates(self.run_dir / "certificates"))
            cmd += ["--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
                    "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth"]
        else:
            cmd.append("--insecure")
        link = self.spawn("superlink", cmd)
        write_connection(self.cli_home, self.connection, self.address,
                         self.credentials.ca_cert if self.tls else None)
        deadline = time.time() + timeout
        while not port_open(self.host, self.superlink_port):
            if not link.running() or time.time() > deadline:
                raise self._failed(link, f"did not open {self.address} within {timeout:.0f} s")
            time.sleep(0.2)
        # the CLI can talk to it (TLS verified against our CA) once `supernode list` succeeds
        while True:
            proc = self.flwr("supernode", "list", self.connection, "--format", "json")
            if proc.returncode == 0 and '"success": true' in proc.stdout:
                break
            if not link.running() or time.time() > deadline:
                raise DeploymentError(f"`flwr supernode list {self.connection}` fails against {self.address}: "
                                      f"{(proc.stdout + proc.stderr).strip()[-800:]}")
            time.sleep(0.5)
        return link

    def start_serverapp_executor(self) -> ManagedProcess:
        cmd = [str(BIN_DIR / "flower-superexec"), "--runtime-api-address", self.address]
        cmd += ["--root-certificates", str(self.credentials.ca_cert)] if self.tls else ["--insecure"]
        return self.spawn("superexec-serverapp", cmd)

    def new_supernode_key(self, name: str) -> Path:
        return generate_supernode_key(self.run_dir / "keys" / name)

    def supernode_key(self, name: str) -> Path:
        """The key pair of SuperNode `name`: from certs_dir/keys/ when it has one, else a fresh one."""
        if self.certs_dir is not None and (self.certs_dir / "keys" / name).is_file():
            return self.certs_dir / "keys" / name
        return self.new_supernode_key(name)

    def register(self, private_key: Path) -> None:
        proc = self.flwr("supernode", "register", str(public_key_of(private_key)), self.connection)
        if proc.returncode != 0:
            raise DeploymentError(f"`flwr supernode register` failed: {(proc.stdout + proc.stderr).strip()[-800:]}")

    def add_supernode(self, partition_id: int, num_partitions: int, malicious: bool | None = None,
                      private_key: Path | None = None, register: bool = True, with_executor: bool = True,
                      name: str | None = None) -> ManagedProcess:
        """Start one SuperNode (and, by default, its ClientApp executor); returns the SuperNode.

        With TLS it authenticates with `private_key` (a fresh key pair when None), which is registered
        with the SuperLink first unless `register=False` (such a node is expected to be refused: it is
        not `essential`). `malicious=None` leaves the key out of the node config (the app then decides
        from `attack.malicious_ids` / `attack.fraction`).
        """
        name = name or f"supernode-{partition_id}"
        port = free_ports(1, self.host)[0]
        node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
        if malicious is not None:
            node_config += f" malicious={'true' if malicious else 'false'}"
        cmd = [str(BIN_DIR / "flower-supernode"), "--superlink", self.address, "--isolation", "process",
               "--host", self.host, "--port", str(port), "--node-config", node_config]
        if self.tls:
            private_key = private_key or self.supernode_key(name)
            if register:
                self.register(private_key)
            cmd += ["--root-certificates", str(self.credentials.ca_cert),
                    "--auth-supernode-private-key", str(private_key)]
        else:
            cmd.append("--insecure")
        node = self.spawn(name, cmd, essential=register or not self.tls)
        node.port = port
        if with_executor:
            self.start_clientapp_executor(node, port)
        return node

    def start_clientapp_executor(self, node: ManagedProcess, port: int, timeout: float = 60.0) -> ManagedProcess:
        # the SuperNode's own Runtime API (plain HTTP on loopback; the SuperLink link is the TLS one)
        deadline = time.time() + timeout
        while not port_open(self.host, port):
            if not node.running() or time.time() > deadline:
                raise self._failed(node, f"did not open its Runtime API on {self.host}:{port}")
            time.sleep(0.2)
        cmd = [str(BIN_DIR / "flower-superexec"), "--insecure", "--runtime-api-address", f"{self.host}:{port}"]
        return self.spawn(f"superexec-clientapp-{node.name.removeprefix('supernode-')}", cmd)

    def wait_for_nodes(self, count: int, timeout: float = 90.0) -> list[dict]:
        """Poll `flwr supernode list` until `count` SuperNodes are online."""
        deadline = time.time() + timeout
        while True:
            online = [n for n in self.list_nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            for proc in self.processes:
                if proc.essential and not proc.running():
                    raise self._failed(proc, "stopped while the SuperNodes were connecting")
            if time.time() > deadline:
                raise DeploymentError(f"only {len(online)} of {count} SuperNodes online after {timeout:.0f} s; "
                                      f"logs in {self.logs}")
            time.sleep(1.0)

    def check_running(self) -> None:
        for proc in self.processes:
            if proc.essential and not proc.running():
                raise self._failed(proc, "is not running")

    # ---- running an experiment
    def run_experiment(self, overrides: Sequence[str], out_dir: Path, config_name: str = "config",
                       timeout: float | None = None, echo: bool = True) -> int:
        """`python -m server.launch --connection <name> --out-dir <out_dir> overrides...`; returns its exit code.

        Its output goes to logs/flwr-run.log (and to stdout with `echo`); after `timeout` seconds it is
        stopped and 124 is returned.
        """
        self.check_running()
        cmd = [sys.executable, "-m", "server.launch", "--connection", self.connection, "--out-dir",
               str(Path(out_dir).resolve()), "--config-name", config_name, *overrides]
        log = self.logs / "flwr-run.log"
        with self._lock:
            if self._stopped:
                raise DeploymentError("the deployment is stopped")
            popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=PROJECT_ROOT, env=self.cli_environment(), start_new_session=True)
            proc = ManagedProcess("flwr-run", cmd, popen, log, essential=False)
            self.processes.append(proc)
            self._write_pid_file()

        def pump() -> None:
            with log.open("ab") as out:
                out.write(f"$ {' '.join(cmd)}\n".encode())
                for line in popen.stdout:
                    out.write(line)
                    out.flush()
                    if echo:
                        sys.stdout.buffer.write(line)
                        sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_processes([proc])
            code = 124
        reader.join(timeout=10)
        return code

    # ---- stopping
    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process this deployment started (and their children), by PID; idempotent."""
        with self._lock:
            self._stopped = True
            procs = list(self.processes)
        # executors and nodes first, the SuperLink last
        stop_processes(list(reversed(procs)), timeout=timeout)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_malicious(spec: str | Iterable[int] | None, num_nodes: int) -> set[int] | None:
    """`"0,2"` -> {0, 2}; `"none"`/`""` -> set(); `"auto"`/None -> None (the app's own attacker draw)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            return None
        if text in ("", "none"):
            return set()
        try:
            ids = {int(x) for x in text.split(",") if x.strip()}
        except ValueError:
            raise DeploymentError(f"--malicious={spec!r} is invalid; allowed: partition ids like 0,2, "
                                  "'none' or 'auto'") from None
    else:
        ids = {int(x) for x in spec}
    bad = sorted(i for i in ids if not 0 <= i < num_nodes)
    if bad:
        raise DeploymentError(f"--malicious={bad} is invalid; allowed: partition ids 0..{num_nodes - 1}")
    return ids


def start_deployment(num_nodes: int = 3, malicious: str | Iterable[int] | None = (0,), tls: bool = True,
                     run_dir: Path | None = None, connection: str = DEFAULT_CONNECTION,
                     ready_timeout: float = 120.0, certs_dir: Path | None = None) -> Deployment:
    """Start a SuperLink, its ServerApp executor and `num_nodes` SuperNodes with executors; wait until ready.

    Returns a `Deployment` (a context manager that stops everything on exit). If anything fails to
    start, what was started is stopped before the error is raised.
    """
    if num_nodes < 1:
        raise DeploymentError(f"--nodes={num_nodes} is invalid; allowed: 1 or more")
    attackers = parse_malicious(malicious, num_nodes)
    run_dir = Path(run_dir or PROJECT_ROOT / "outputs" / "deploy" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    dep = Deployment(run_dir, tls=tls, connection=connection, certs_dir=certs_dir)
    dep.num_partitions = num_nodes
    try:
        dep.start_superlink(timeout=ready_timeout)
        dep.start_serverapp_executor()
        for i in range(num_nodes):
            dep.add_supernode(i, num_nodes, None if attackers is None else i in attackers)
        dep.wait_for_nodes(num_nodes, timeout=ready_timeout)
        dep.check_running()
    except BaseException:
        dep.stop()
        raise
    return dep


# --------------------------------------------------------------------------------------------- CLI


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def print_records(out_dir: Path) -> None:
    summary = out_dir / "summary.json"
    print(f"thorn: records in {out_dir}")
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "curves.png", "checkpoint.pt"):
        if (out_dir / name).exists():
            print(f"  {out_dir / name}")
    if summary.exists():
        data = json.loads(summary.read_text())
        print(f"  finished={data.get('finished')} final_ma={data.get('final_ma')} final_asr={data.get('final_asr')}")


def cmd_local(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    set_clients = [o for o in overrides if o.split("=", 1)[0] == "num_clients"]
    if set_clients and set_clients[-1] != f"num_clients={args.nodes}":
        print(f"thorn: {set_clients[-1]} but --nodes={args.nodes}; they must match", file=sys.stderr)
        return 2
    if not set_clients:
        overrides.append(f"num_clients={args.nodes}")
    run_dir = Path(args.run_dir or PROJECT_ROOT / "outputs" / "deploy" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir = Path(args.out_dir or run_dir / "records").resolve()
    # Ctrl-C, SIGTERM and SIGHUP all end in the same clean shutdown (also when SIGINT was inherited as ignored)
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM,
                                                                             signal.SIGHUP)}
    dep = None
    t0 = time.time()
    try:
        print(f"thorn: starting {'a TLS + SuperNode-authenticated' if args.tls else 'an INSECURE'} deployment with "
              f"{args.nodes} SuperNodes (malicious: {args.malicious}); logs in {run_dir / 'logs'}", flush=True)
        dep = start_deployment(args.nodes, args.malicious, tls=args.tls, run_dir=run_dir,
                               connection=args.connection, ready_timeout=args.ready_timeout,
                               certs_dir=Path(args.certs_dir) if args.certs_dir else None)
        print(f"thorn: SuperLink {dep.address} ready, {args.nodes} SuperNodes online after {time.time() - t0:.1f} s "
              f"(PIDs {' '.join(map(str, dep.pids))})", flush=True)
        if args.serve:
            print(f"thorn: serving; in another shell:\n  export FLWR_HOME={dep.cli_home} "
                  + " ".join(f"{k}={v}" for k, v in FLWR_ENV.items())
                  + f"\n  flwr run {PROJECT_ROOT} {dep.connection} --stream --run-config "
                  f"'overrides=\"num_clients={args.nodes} ...\" out-dir=\"/abs/dir\"'\n"
                  f"  python -m server.launch --connection {dep.connection} --out-dir /abs/dir "
                  f"num_clients={args.nodes} ...\nCtrl-C stops everything.", flush=True)
            while True:
                dep.check_running()
                time.sleep(2)
        code = dep.run_experiment(overrides, out_dir, config_name=args.config_name)
        print_records(out_dir)
        print(f"thorn: deployment logs in {dep.logs}; total {time.time() - t0:.1f} s", flush=True)
        return code
    except KeyboardInterrupt:
        print("\nthorn: interrupted; stopping the deployment", file=sys.stderr)
        return 130
    except DeploymentError as exc:
        print(f"thorn: deployment error: {exc}", file=sys.stderr)
        return 1
    finally:
        if dep is not None:
            dep.stop()
            left = [pid for pid in dep.pids if pid_alive(pid)]
            print(f"thorn: stopped {len(dep.pids)} processes" + (f"; STILL RUNNING: {left}" if left else ""),
                  file=sys.stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.deploy",
                                     description="Run thorn on Flower's deployment engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="SuperLink + SuperNodes + executors on 127.0.0.1, then one experiment",
                           description="Start a real Flower deployment on 127.0.0.1 and run one experiment on it.")
    local.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke attack=badnets "
                       "(num_clients is set to --nodes)")
    local.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (= num_clients)")
    local.add_argument("--malicious", default="0", help="partition ids of the attacking SuperNodes, comma-"
                       "separated (node config malicious=true); 'none': all benign; 'auto': leave it to "
                       "attack.fraction/attack.malicious_ids as in simulation (default: 0)")
    tls = local.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="tls", action="store_true", default=True,
                     help="TLS + SuperNode authentication (default)")
    tls.add_argument("--insecure", dest="tls", action="store_false", help="plain HTTP, no authentication")
    local.add_argument("--run-dir", default=None, help="folder for logs, certificates, keys and Flower homes "
                       "(default: outputs/deploy/<timestamp>)")
    local.add_argument("--out-dir", default=None, help="folder for the run records (default: <run-dir>/records)")
    local.add_argument("--certs-dir", default=None, help="TLS material made by docker/gen-certs.sh "
                       "(certificates/, keys/supernode-<i>) instead of fresh certificates in the run folder")
    local.add_argument("--connection", default=DEFAULT_CONNECTION, help="name of the CLI connection")
    local.add_argument("--config-name", default="config")
    local.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the start-up")
    local.add_argument("--serve", action="store_true", help="start the federation and wait for Ctrl-C "
                       "instead of running an experiment")
    args = parser.parse_args(argv)
    return cmd_local(args)


if __name__ == "__main__":
    sys.exit(main())
