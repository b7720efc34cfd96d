"""A server process on a free loopback port (the service by default), for benchmarks and tests."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence

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


def read_metric(url: str, name: str) -> float:
    """One sample of the /metrics page of the server at ``url``."""
    return metric_value(httpx.get(f"{url}/metrics").text, name)


def fixed_weights(model: str, directory: str) -> Dict[str, str]:
    """``HALO_CHECKPOINT`` for a model without shipped weights: random ones written to ``directory``, the
    same for every start and server (each start would otherwise draw its own: no compile cache could hit,
    and ``HALO_COMPILE=auto`` leaves a model without weights uncompiled, as a trained one would not be)."""
    from safetensors.torch import save_file

    from model import create_model
    from model.halonet import shipped_weights

    if shipped_weights(model) is not None:
        return {}
    path = Path(directory) / f"{model}.safetensors"
    save_file(create_model(model).state_dict(), path)
    return {"HALO_CHECKPOINT": str(path)}


class ServerProcess:
    """A server on a free loopback port, in a session of its own, so that every process it starts
    (LitServe's workers) is signalled, measured and stopped with it. By default the service with the
    given HALO_* settings; ``command`` runs another module (``{port}`` in its arguments is filled
    in), ready once ``ready_path`` answers 200. ``stop`` sends SIGTERM (graceful)."""

    def __init__(self, env: Dict[str, str], command: Sequence[str] = ("app",), ready_path: str = "/readyz"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        full_env = {**os.environ, "HALO_HOST": "127.0.0.1", "HALO_PORT": str(self.port),
                    "HALO_LOG_LEVEL": "warning", **env}
        # Output to a file, not a pipe nobody reads while it runs: a full pipe would block the server.
        self.output = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", *(a.format(port=self.port) for a in command)],
                                        cwd=ROOT, env=full_env, stdout=self.output, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.process.poll() is not None:
                self.output.seek(0)
                raise RuntimeError(f"server exited: {self.output.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def metric(self, name: str) -> float:
        return read_metric(self.url, name)

    def signal(self, number: int) -> None:
        """To every process of its session (SIGSTOP freezes it whole, SIGCONT thaws it)."""
        os.killpg(self.process.pid, number)

    def cpu_seconds(self) -> float:
        """CPU time every process of its session has used so far, all their threads (Linux /proc)."""
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[3]) == self.process.pid:  # session id
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return total

    def stop(self) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)  # a frozen server could not act on SIGTERM
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        self.output.close()
        return self.process.returncode
