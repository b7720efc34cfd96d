"""docker/nginx.conf in front of two replicas on loopback: one is killed during a burst, no request fails."""
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import httpx
import pytest

from benchmarks.server import ROOT, free_port
from tests.burst import Burst, shaded_pngs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")]


def loopback_config(listen: int, upstreams: List[str]) -> str:
    """The project's nginx.conf on loopback: the listen port rewritten, and the replicas' name, which
    nginx resolves through Docker's DNS in compose, pointed at an upstream block of these servers
    (a variable naming an upstream block takes that group instead of asking a resolver)."""
    config = (ROOT / "docker" / "nginx.conf").read_text()
    config, listens = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen};", config)
    servers = "".join(f"        server {u};\n" for u in upstreams)
    config, named = re.subn(r"set \$api_replicas api-replica:8000;", "set $api_replicas loopback_replicas;", config)
    config, added = re.subn(r"^\s*server \{", f"    upstream loopback_replicas {{\n{servers}    }}\n\\g<0>",
                            config, count=1, flags=re.M)
    assert listens == 1 and named == 1 and added == 1, "docker/nginx.conf changed shape: update this test"
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
    burst = Burst(url, clients=6, requests=25, images=shaded_pngs())
    burst.wait_for(30)  # under way, both replicas serving
    served_before = survivor.metric('halo_requests_total{route="/predict",status="200"}')
    doomed.process.send_signal(signal.SIGKILL)
    outcomes = burst.join()
    assert len(outcomes) == 150 and set(outcomes) == {200}, Burst.tally(outcomes)
    assert survivor.metric('halo_requests_total{route="/predict",status="200"}') > served_before + 60
