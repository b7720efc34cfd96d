"""A Docker engine of the test's own: dockerd with its data, state, pidfile and socket in one
folder, in the network namespace the caller runs in (tests/docker/compose_e2e.py makes a private
one). Nothing of the machine's own Docker set-up is used or touched."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional


class PrivateDockerd:
    def __init__(self, folder: Path):
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60) -> None:
        # No userland proxy: a published port is forwarded by the kernel, so a client sees a refused
        # connection when the service stops listening, as it would without Docker in between.
        # Its own configuration file too: none of /etc/docker is read, and its key is kept here.
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.folder / "key.json")}))
        command = ["dockerd", "--config-file", str(config), "--data-root", str(self.folder / "data"),
                   "--exec-root", str(self.folder / "exec"), "--pidfile", str(self.folder / "dockerd.pid"),
                   "--host", f"unix://{self.socket}", "--storage-driver", "overlay2", "--userland-proxy=false"]
        with (self.folder / "dockerd.log").open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        until = time.monotonic() + timeout
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"dockerd did not start: {self.log_tail()}")
            time.sleep(0.5)

    def docker(self, *args: str, check: bool = True, timeout: float = 600,
               input: Optional[str] = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()[-2000:]}")
        return result

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "dockerd.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Removes every container, stops dockerd by its pid, then whatever it left in this network
        namespace (container shims); finally unmounts and removes the folder."""
        if self.process is not None and self.process.poll() is None:
            containers = self.docker("ps", "-aq", check=False).stdout.split()
            if containers:
                self.docker("rm", "-f", *containers, check=False)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for mount in reversed(mounts_under(self.folder)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.folder)], check=False)


def leftover_pids() -> List[int]:
    """Processes in this network namespace but this one: once dockerd is gone, what it left."""
    own = os.readlink("/proc/self/ns/net")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "ns" / "net") == own:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def mounts_under(folder: Path) -> List[str]:
    prefix = str(folder.resolve())
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix)]
