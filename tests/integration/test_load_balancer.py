"""docker/nginx.conf in front of two replicas on loopback: one is killed during a burst, no request fails."""
import io
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List

import httpx
import pytest
from PIL import Image

from benchmarks.server import ROOT, free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")]


def loopback_config(listen: int, upstreams: List[str]) -> str:
    """The project's nginx.conf with the listen port and the replicas rewritten for loopback."""
    config = (ROOT / "docker" / "nginx.conf").read_text()
    config, listens = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen};", config)
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=10s;" for u in upstreams)
    config, replaced = re.subn(r"^\s*server api-replica:8000[^;]*;", servers, config, flags=re.M)
    assert listens == 1 and replaced == 1, "docker/nginx.conf changed shape: update this test"
    return config


@pytest.fixture
def nginx(tmp_path: Path, start_server, random_compact_checkpoint):
    replicas = [start_server(HALO_CHECKPOINT=str(random_compact_checkpoint)) for _ in range(2)]
    port = free_port()
    (tmp_path / "nginx.conf").write_text(loopback_config(port, [f"127.0.0.1:{r.port}" for r in replicas]))
    process = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                                "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    until = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < until, process.stdout.read().decode() if process.poll() is not None else ""
            time.sleep(0.1)
    yield url, replicas
    process.send_signal(signal.SIGQUIT)
    process.wait(10)


def test_a_replica_killed_during_a_burst_costs_no_request(nginx) -> None:
    url, (doomed, survivor) = nginx
    images = []
    for shade in range(40, 240, 25):
        buffer = io.BytesIO()
        Image.new("L", (28, 28), shade).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    statuses: List[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(25):
                response = http.post("/predict", files=[("file", ("x", images[(index + i) % len(images)]))])
                with lock:
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    while len(statuses) < 30:  # the burst is under way, both replicas serving
        time.sleep(0.01)
    served_before = survivor.metric('halo_requests_total{route="/predict",status="200"}')
    doomed.process.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join()
    assert len(statuses) == 150 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert survivor.metric('halo_requests_total{route="/predict",status="200"}') > served_before + 60
