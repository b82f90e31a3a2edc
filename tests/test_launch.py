"""The launcher stops only the managed local SuperLink of its own FLWR_HOME and control port."""

from __future__ import annotations

import subprocess
import sys

from server.launch import local_superlink_pids


def fake_superlink(home, port: str) -> subprocess.Popen:
    # a process whose command line looks like `flwr run`'s managed local SuperLink
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flower-superlink", "--insecure",
                             "--control-api-address", f"127.0.0.1:{port}", "--log-file",
                             f"{home}/local-superlink/superlink.log"])


def test_only_the_superlink_on_this_runs_control_port_is_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    mine, other = fake_superlink(tmp_path, "45123"), fake_superlink(tmp_path, "45124")
    try:
        monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", "45123")
        assert local_superlink_pids() == {mine.pid}
        monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", "45124")
        assert local_superlink_pids() == {other.pid}
        monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", "4512")  # a prefix of both ports is neither
        assert local_superlink_pids() == set()
        monkeypatch.setenv("FLWR_HOME", str(tmp_path / "elsewhere"))
        monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", "45123")
        assert local_superlink_pids() == set()  # another FLWR_HOME's SuperLink is not ours either
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait()
