import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). It must be chosen
# before the kernels are defined, that is before `model` is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.server import ServerProcess  # noqa: E402
from model import create_model  # noqa: E402  (after choosing the Triton mode above)

# Tests compare numbers, not speed: one thread keeps them deterministic and leaves the
# other core to pytest's own work.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def random_compact_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compact model with random weights: the service's tests do not care what it learned."""
    path = tmp_path_factory.mktemp("weights") / "halonet_compact.safetensors"
    save_file(create_model("halonet_compact").state_dict(), path)
    return path


@pytest.fixture
def start_server() -> Iterator:
    """Real servers: ``start_server(**HALO_env)`` runs ``python -m app`` on a free loopback port
    and waits until it is ready; each is stopped (SIGTERM, then SIGKILL) when the test ends."""
    servers = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess({"HALO_THREADS": "1", **env})
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
