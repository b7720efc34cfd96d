"""Real servers: ``python -m app`` in a subprocess on a free loopback port."""
from typing import Iterator

import pytest

from benchmarks.server import ServerProcess


@pytest.fixture
def start_server() -> Iterator:
    servers = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess({"HALO_THREADS": "1", **env})
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
