"""A ``python -m app`` process on a free loopback port, for benchmarks and integration tests."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(exposition: str, name: str) -> float:
    """One sample of a /metrics page, by its full name (labels included, as Prometheus prints them)."""
    for line in exposition.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class ServerProcess:
    """Starts the service with the given HALO_* settings; ``stop`` sends SIGTERM (graceful)."""

    def __init__(self, env: Dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "HALO_HOST": "127.0.0.1", "HALO_PORT": str(self.port),
                    "HALO_LOG_LEVEL": "warning", **env}
        self.process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=full_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def metric(self, name: str) -> float:
        return metric_value(httpx.get(f"{self.url}/metrics").text, name)

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, all its threads (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
