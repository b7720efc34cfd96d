"""docker-compose.yml and the monitoring configs, checked as far as a machine without a Docker
engine can: the compose file is valid for every profile (docker-compose's own validation), and
every path, port, service name, setting and metric it and its configs name exists."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from app.config import Settings
from app.metrics import Metrics
from benchmarks.server import ROOT
from tests.dockerfiles import HEALTHCHECK_SCRIPT, image_path
from tests.settings_names import SETTING_VARIABLES

COMPOSE_FILE = ROOT / "docker-compose.yml"
MONITORING = ROOT / "docker" / "monitoring"
PROFILES = ["", "gpu", "scale", "monitoring", "loadtest"]


def compose() -> Dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> Dict[str, Dict]:
    return compose()["services"]


def docker_compose() -> str:
    """The docker-compose command (Debian's package; .ci/run installs it). Missing in CI is a failure."""
    path = shutil.which("docker-compose")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed: .ci/run should have installed it")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return path


def validate(compose_file: Path, profile: str) -> subprocess.CompletedProcess:
    command = [docker_compose(), "--project-directory", str(ROOT), "-f", str(compose_file)]
    command += ["--profile", profile] if profile else []
    return subprocess.run(command + ["config", "--quiet"], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p or "default")
def test_compose_file_is_valid_for_every_profile(profile: str) -> None:
    result = validate(COMPOSE_FILE, profile)
    assert result.returncode == 0, result.stderr


def test_validation_catches_a_broken_file(tmp_path: Path) -> None:
    broken = COMPOSE_FILE.read_text().replace("restart: unless-stopped", "restart: [unless-stopped]", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    assert validate(tmp_path / "docker-compose.yml", "").returncode != 0


def test_profiles_hold_the_services_each_is_for() -> None:
    by_profile: Dict[str, List[str]] = {}
    for name, service in services().items():
        for profile in service.get("profiles", [""]):
            by_profile.setdefault(profile, []).append(name)
    assert by_profile == {"": ["api"], "gpu": ["api-gpu"], "scale": ["api-replica", "lb"],
                          "monitoring": ["prometheus", "grafana"], "loadtest": ["loadtest"]}
    gpu = services()["api-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services()["api-replica"]["deploy"]["replicas"] >= 2


def test_api_services_are_healthchecked_limited_and_restarted() -> None:
    for name in ("api", "api-gpu", "api-replica"):
        service = services()[name]
        script = image_path(ROOT / service["build"]["dockerfile"], HEALTHCHECK_SCRIPT)
        assert service["healthcheck"]["test"] == ["CMD", "python", script, "/readyz"], name
        assert service["restart"] == "unless-stopped", name
        assert "memory" in service["deploy"]["resources"]["limits"], name
        assert "./checkpoints:/checkpoints:ro" in service["volumes"], name


def test_referenced_paths_exist() -> None:
    for name, service in services().items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_settings_named_in_compose_exist() -> None:
    named = set(re.findall(r"HALO_[A-Z_]+", COMPOSE_FILE.read_text()))
    assert named and named <= SETTING_VARIABLES, named - SETTING_VARIABLES


def test_ports_match_the_service_and_its_consumers() -> None:
    port = Settings().port
    assert services()["api"]["ports"] == [f"8000:{port}"]
    assert services()["api-gpu"]["ports"] == [f"8001:{port}"]
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    assert re.findall(r"set \$api_replicas (\S+?):(\d+);", nginx) == [("api-replica", str(port))]
    assert services()["lb"]["ports"] == ["8080:80"] and re.search(r"^\s*listen 80;", nginx, flags=re.M)
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
    for target in (sd for job in scrape for sd in job["dns_sd_configs"]):
        assert target["port"] == port
        assert set(target["names"]) <= set(services()), target["names"]
    assert "http://api:8000" in services()["loadtest"]["command"][1]


def test_the_load_balancer_passes_every_body_the_api_would_take() -> None:
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    size, unit = re.search(r"^\s*client_max_body_size (\d+)([kKmMgG]?);", nginx, flags=re.M).groups()
    limit = int(size) * {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30}[unit.lower()]
    assert "HALO_MAX_BODY_BYTES" not in services()["api-replica"]["environment"]  # the replicas take the default
    assert limit >= Settings().max_body_bytes, (limit, Settings().max_body_bytes)


def test_grafana_provisioning_points_at_the_mounted_dashboard_and_prometheus() -> None:
    provisioning = MONITORING / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services()
    provider = yaml.safe_load((provisioning / "dashboards" / "halonet.yml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services()["grafana"]["volumes"])
    assert mounts["./docker/monitoring/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "halonet.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {source["uid"]}


def exported_series() -> set:
    """Every series name the service exports, as Prometheus sees them."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def test_dashboard_queries_only_metrics_the_service_exports() -> None:
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "halonet.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in expressions for name in re.findall(r"\bhalo_[a-z_]+", e)}
    assert used and used <= exported_series(), used - exported_series()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests per second", "latency", "batch size", "queue depth", "errors"):
        assert topic in titles, topic


def test_docker_waits_longer_than_the_service_drains() -> None:
    """Docker's SIGKILL comes after the service's own drain budget: the service decides when it stops."""
    for name in ("api", "api-gpu", "api-replica"):
        grace = services()[name]["stop_grace_period"]
        assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) > Settings().drain_seconds, (name, grace)
