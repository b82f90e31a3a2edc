"""Launch one thorn experiment through `flwr run`, the same code path for simulation and deployment.

    python -m server.launch strategy=fedavg attack=badnets num_rounds=10
    python -m server.launch --connection my-deployment --out-dir /abs/dir strategy=fedavg

It composes and validates the config first (a bad key fails here, in one line, before Flower starts),
writes the run config as a TOML file, and calls `flwr run <project> [connection] --stream` with the
simulation size taken from the config (`num-supernodes = num_clients`, client resources). For local
simulation it stops the managed local SuperLink afterwards if this call was the one that started it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from task.config import PROJECT_ROOT, ConfigError, compose_config

FLWR_ENV = {
    # without it the SuperLink `uv sync`s the project's dependencies (torch!) into a fresh venv per run
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def flwr_environment() -> dict[str, str]:
    env = {**os.environ, **FLWR_ENV}
    # the flwr CLI must come from the same environment as this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Every simulation starts a Ray instance of its own. Without this, ray.init() may attach to another
    # simulation's instance running on the same machine (Ray connects to the "latest" one it finds),
    # whose workers import that run's code (their sys.path starts with the other driver's folder).
    env.setdefault("RAY_ADDRESS", "local")
    return env


def default_out_dir(cfg: DictConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return PROJECT_ROOT / "outputs" / f"{stamp}-{cfg.strategy.name}-{cfg.attack.name}"


def federation_config(cfg: DictConfig) -> str:
    return (f"num-supernodes={cfg.num_clients} "
            f"client-resources-num-cpus={int(cfg.client_resources.num_cpus)} "
            f"client-resources-num-gpus={float(cfg.client_resources.num_gpus)}")


def write_run_config(path: Path, overrides: list[str], out_dir: Path, config_name: str = "config") -> Path:
    """The app's run config as TOML (json.dumps gives valid TOML basic strings)."""
    path.write_text(f"overrides = {json.dumps(' '.join(overrides))}\n"
                    f"config-name = {json.dumps(config_name)}\n"
                    f"out-dir = {json.dumps(str(out_dir))}\n")
    return path


def flwr_run_command(cfg: DictConfig, run_config_file: Path, connection: str | None = None) -> list[str]:
    cmd = ["flwr", "run", str(PROJECT_ROOT)]
    if connection:
        cmd.append(connection)
    cmd += ["--stream", "--run-config", str(run_config_file)]
    if connection is None:  # the simulation's size comes from the config; a deployment has its SuperNodes
        cmd += ["--federation-config", federation_config(cfg)]
    return cmd


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


def local_control_port() -> str:
    """The control-API port of the managed local SuperLink `flwr run` uses (Flower's default, or the
    FLWR_LOCAL_CONTROL_API_PORT environment variable)."""
    return os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", "39093")


def local_superlink_pids() -> set[int]:
    """PIDs of the managed local SuperLink (`flwr run` starts one and leaves it running) of THIS
    FLWR_HOME and control port. Matching the port matters: another run on the same machine with its
    own ports has its own SuperLink, which must not be stopped when this run ends."""
    marker = str(_flwr_home() / "local-superlink")
    address = f"--control-api-address 127.0.0.1:{local_control_port()} "
    out = subprocess.run(["pgrep", "-af", f"flower-superlink.*{marker}"], capture_output=True, text=True)
    pids = set()
    for line in out.stdout.splitlines():
        pid, _, cmdline = line.partition(" ")
        if address in cmdline + " ":
            pids.add(int(pid))
    return pids


def signal_pids(pids: set[int], sig: int) -> None:
    """Send `sig` to each pid; one that has already gone is no error."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_pids(pids: set[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout`."""
    signal_pids(pids, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    signal_pids({p for p in pids if Path(f"/proc/{p}").exists()}, signal.SIGKILL)


def launch(overrides: list[str], out_dir: Path | None = None, connection: str | None = None,
           keep_superlink: bool = False, config_name: str = "config", check_records: bool = True) -> int:
    """Run one experiment; returns flwr's exit code (2 for a config error)."""
    from server.app import check_run

    try:
        cfg = compose_config(overrides, config_name)
        check_run(cfg)
    except ConfigError as exc:
        print(f"thorn: config error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(out_dir or cfg.out_dir or default_out_dir(cfg)).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    before = local_superlink_pids()
    with tempfile.TemporaryDirectory() as tmp:
        run_config = write_run_config(Path(tmp) / "run_config.toml", overrides, out_dir, config_name)
        cmd = flwr_run_command(cfg, run_config, connection)
        print("thorn:", " ".join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=PROJECT_ROOT, env=flwr_environment()).returncode
    if connection is None and not keep_superlink:
        stop_pids(local_superlink_pids() - before)
    summary = out_dir / "summary.json"
    if check_records and code == 0 and not (summary.exists() and json.loads(summary.read_text()).get("finished")):
        print(f"thorn: the run did not finish (no finished summary.json in {out_dir}); see the log above",
              file=sys.stderr)
        code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one thorn experiment through `flwr run`.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fedavg attack=badnets")
    parser.add_argument("--out-dir", default=None, help="folder for the run records")
    parser.add_argument("--connection", default=None, help="a SuperLink connection of flwr's config.toml "
                        "(deployment); default: local simulation")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    parser.add_argument("--config-name", default="config")
    parser.add_argument("--remote-records", action="store_true", help="the ServerApp writes its records on "
                        "another machine or container (do not look for them here)")
    args = parser.parse_args(argv)
    return launch(args.overrides, Path(args.out_dir) if args.out_dir else None, args.connection,
                  args.keep_superlink, args.config_name, check_records=not args.remote_records)


if __name__ == "__main__":
    sys.exit(main())
