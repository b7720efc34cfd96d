"""The images, checked as far as a machine without a Docker engine can: hadolint, and everything
the Dockerfiles copy or set exists in the project and its settings."""
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from app.config import Settings
from benchmarks.server import ROOT
from tests.dockerfiles import HEALTHCHECK_SCRIPT, copy_instructions, docker_ignored, image_path
from tests.settings_names import SETTING_VARIABLES

SERVICE_DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
DOCKERFILES = SERVICE_DOCKERFILES + [ROOT / "docker" / "Dockerfile.loadtest"]
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    # Rules ignored in the files themselves carry their reason on the line above.
    result = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_rule_reads_exceptions() -> None:
    assert docker_ignored("tests/unit/test_docker.py") and docker_ignored(".venv/bin/python")
    assert not docker_ignored("tests/load/locustfile.py") and not docker_ignored("model/halonet.py")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_docker_ignored(dockerfile: Path) -> None:
    sources = [source for sources, _ in copy_instructions(dockerfile) for source in sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not docker_ignored(source), source


@pytest.mark.parametrize("dockerfile", SERVICE_DOCKERFILES, ids=lambda p: p.name)
def test_service_settings_named_in_dockerfiles_exist(dockerfile: Path) -> None:
    assert set(re.findall(r"HALO_[A-Z_]+", dockerfile.read_text())) <= SETTING_VARIABLES
    assert "EXPOSE 8000" in dockerfile.read_text() and Settings().port == 8000


@pytest.mark.parametrize("dockerfile", SERVICE_DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_runs_the_script_the_image_copies(dockerfile: Path) -> None:
    command = re.search(r"^HEALTHCHECK .*\\\n\s*CMD (.+)$", dockerfile.read_text(), flags=re.M)[1]
    assert json.loads(command) == ["python", image_path(dockerfile, HEALTHCHECK_SCRIPT), "/healthz"]


class AliveNotReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep the test's output to the failures
        pass


def run_healthcheck(path: str, port: int) -> int:
    command = [sys.executable, str(ROOT / HEALTHCHECK_SCRIPT), path]
    return subprocess.run(command, env={**os.environ, "HALO_PORT": str(port)}, timeout=30).returncode


def test_healthcheck_script_exits_0_on_200_and_1_otherwise() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AliveNotReady)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert run_healthcheck("/healthz", port) == 0 and run_healthcheck("/readyz", port) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert run_healthcheck("/healthz", port) == 1  # nothing listens
    assert set(re.findall(r"HALO_[A-Z_]+", (ROOT / HEALTHCHECK_SCRIPT).read_text())) <= SETTING_VARIABLES


@pytest.mark.slow
def test_installed_package_carries_the_default_model(tmp_path: Path) -> None:
    """The images `pip install .`: the wheel must hold the shipped weights, the class names and the
    CPU kernel's source (the CPU image compiles it from the installed package)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for needed in ("model/weights/halonet_compact.safetensors", "model/labels/fashion_mnist.txt",
                   "model/labels/imagenet1k.txt", "model/attention/csrc/halo_attention.cpp", "app/main.py"):
        assert needed in names, needed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_takes_its_indexes_from_build_args(dockerfile: Path) -> None:
    """Builds behind a mirror or offline: pip's variables are build args before its first install."""
    text = dockerfile.read_text()
    declared = re.search(r"^ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST$", text, re.M)
    assert declared and declared.start() < text.index("pip install")
    if dockerfile.name == "Dockerfile":
        assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
        assert 'pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==' in text
