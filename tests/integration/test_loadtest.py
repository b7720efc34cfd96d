"""`make loadtest` in its short mode: Locust runs against a real server and the report is complete;
and the load-test image's files run it on their own."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.server import ROOT
from tests.dockerfiles import copy_instructions

pytestmark = pytest.mark.slow
REPORT_FILES = ["locust.html", "locust_stats.csv", "locust_stats_history.csv", "throughput.png", "latency.png",
                "by_users.png", "summary.md"]


def test_short_load_test_writes_its_report_and_fails_nothing(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--users", "8", "--spawn-rate", "4",
                             "--duration", "20", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    aggregated = next(line for line in (tmp_path / "locust_stats.csv").read_text().splitlines()
                      if ",Aggregated," in line)
    requests, failures = (int(v) for v in aggregated.split(",")[2:4])
    assert requests > 50 and failures == 0
    assert "| Aggregated |" in (tmp_path / "summary.md").read_text()


def test_the_load_test_image_files_alone_run_against_a_url(tmp_path: Path, start_server) -> None:
    """docker/Dockerfile.loadtest copies only a few files and installs no torch: they must be enough."""
    image = tmp_path / "image"
    for sources, destination in copy_instructions(ROOT / "docker" / "Dockerfile.loadtest"):
        (image / destination).mkdir(parents=True, exist_ok=True)
        for source in sources:
            shutil.copy(ROOT / source, image / destination)
    server = start_server()
    # As in the image: the project's packages cannot be imported, nor torch.
    blocked = "import runpy, sys; sys.modules.update(torch=None, model=None, app=None); " \
              "runpy.run_module('benchmarks.loadtest', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", blocked, "--url", server.url, "--users", "2", "--spawn-rate", "2",
                             "--duration", "6", "--out", str(tmp_path / "report")], cwd=image,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| Aggregated |" in (tmp_path / "report" / "summary.md").read_text()
