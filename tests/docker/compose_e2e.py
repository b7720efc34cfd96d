"""`docker compose up` for real: the project's images built and its compose stack run, offline.

    python -m tests.docker.compose_e2e      (make test-docker; .ci/run runs it; needs root)

Set-up, while the network is there (both cached in HALO_E2E_CACHE, default /var/cache/halonet-e2e,
keyed on their inputs): a Debian bookworm root from debootstrap, the stand-in for the upstream base
images (tests/docker/standins.py), and a wheelhouse of every package the Dockerfiles install
(tests/docker/wheelhouse.py). Everything else runs in a private network and mount namespace
(``unshare``): a dockerd of its own (tests/docker/dockerd.py), the wheelhouse served on loopback as
the package index, and the phases below, each checked, each timed:

  build      docker-compose build with only PIP_INDEX_URL / TORCH_INDEX_URL pointed at the
             wheelhouse: the image runs as uid 10001 and carries the C++ kernel compiled at build
             time. (PyPI's torch 2.14.1 is a CUDA build of several GB; the PyTorch CPU index the
             image uses by default is out of this machine's reach, so the image built here is that
             much larger than a user's.)
  up         the api container turns healthy through its own healthcheck within its start period;
             a photo and a Fashion-MNIST PNG through the published port get the top-5 that the
             same model served on the host (`make serve`) gives; heatmaps; /metrics counts them
  k8s pod    the Kubernetes base Deployment's pod (deploy/k8s/base, rendered) run by docker as the
             kubelet would (tests/docker/k8s_pod.py): read-only root, its user, its emptyDirs; the
             init container's copy of the kernel is loaded (cpp) without compiling it again; a v2
             inference; SIGTERM ends it with status 0
  loadtest   the loadtest profile, 15 s with 8 users against api: no failure, report on the host
  crash      the api's process killed with SIGKILL (as an out-of-memory kill would): its restart
             policy starts it again and /readyz answers 200 again
  scale      nginx in front of 3 replicas, the third added after nginx started: a burst of 150
             spreads over all three (their own /metrics); a replica killed mid-burst costs nothing
  stop       `docker-compose stop api` while 48 requests are queued or computing: each accepted
             request is answered 200 and the service exits by itself, status 0, before Docker's SIGKILL
  down       `down -v` leaves no container, network or volume of the project

Not covered: the CUDA image (no GPU here) and Grafana (not in Debian; its provisioning is checked by
tests/unit/test_compose.py). Where dockerd cannot run at all (not root, no overlay filesystem, no
namespaces), the script says why and skips; in CI, missing packages are a failure.
"""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import httpx
from PIL import Image

from benchmarks.closed_loop import fashion_pngs
from benchmarks.server import ROOT, ServerProcess, free_port, metric_value, read_metric
from tests.burst import Burst, shaded_pngs
from tests.docker.dockerd import PrivateDockerd
from tests.docker.k8s_pod import run_base_pod
from tests.docker.standins import import_images, root_archive
from tests.docker.waiting import answers_200, wait_until
from tests.docker.wheelhouse import wheelhouse

PROJECT = "halonet-e2e"
API = "http://127.0.0.1:8000"
LB = "http://127.0.0.1:8080"
PREDICTED = 'halo_requests_total{route="/predict",status="200"}'
NEEDED = ["dockerd", "docker", "docker-compose", "debootstrap", "unshare", "ip", "tar"]


class Phases:
    """Runs named checks in order, prints each with its time; after a failure the rest are skipped."""

    def __init__(self, passed: int = 0) -> None:
        self.passed, self.failed, self.skipped = passed, 0, 0

    def run(self, name: str, check: Callable[[], Optional[str]]) -> None:
        if self.failed:
            self.skipped += 1
            print(f"[{name}] skipped after a failure", flush=True)
            return
        print(f"[{name}] ...", flush=True)
        start = time.monotonic()
        try:
            detail = check()
        except Exception:
            self.failed += 1
            traceback.print_exc()
            print(f"[{name}] FAILED after {time.monotonic() - start:.1f} s", flush=True)
        else:
            self.passed += 1
            print(f"[{name}] ok in {time.monotonic() - start:.1f} s{': ' + detail if detail else ''}", flush=True)

    def summary(self) -> str:
        return f"compose-e2e: {self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def cannot_run() -> Optional[str]:
    """Why dockerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay filesystem (dockerd's overlay2 driver)"
    missing = [c for c in NEEDED if shutil.which(c) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install docker.io docker-compose debootstrap iproute2)"
    if subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode != 0:
        return "cannot create network and mount namespaces (unshare --net --mount)"
    return None


def main() -> int:
    cache = Path(os.environ.get("HALO_E2E_CACHE", "/var/cache/halonet-e2e"))
    if sys.argv[1:2] == ["--in-namespace"]:
        return in_namespace(Path(sys.argv[2]), Path(sys.argv[3]), passed=int(sys.argv[4]))
    reason = cannot_run()
    if reason:
        print(f"compose-e2e: skipped: {reason}")
        return 1 if os.environ.get("CI") and reason.startswith("missing") else 0
    phases = Phases()
    found: Dict[str, Path] = {}
    phases.run("base image stand-in", lambda: str(found.setdefault("archive", root_archive(cache))))
    phases.run("wheelhouse", lambda: str(found.setdefault("wheels", wheelhouse(cache))))
    if phases.failed:
        print(phases.summary())
        return 1
    # The rest in namespaces of its own: its dockerd, its network, its mounts go when it ends.
    return subprocess.call(["unshare", "--net", "--mount", "--propagation", "private", sys.executable, "-m",
                            "tests.docker.compose_e2e", "--in-namespace", str(found["archive"]), str(found["wheels"]),
                            str(phases.passed)],
                           cwd=ROOT)


def in_namespace(archive: Path, wheels: Path, passed: int) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="halonet-e2e-"))
    index_port = free_port()
    index = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(index_port),
                              "--directory", str(wheels)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dockerd = PrivateDockerd(work / "docker")
    stack = Stack(dockerd, work, f"http://127.0.0.1:{index_port}/simple")
    phases = Phases(passed)
    try:
        phases.run("dockerd", lambda: start_engine(dockerd, archive))
        phases.run("build", stack.build)
        phases.run("up", stack.up)
        phases.run("k8s pod", lambda: run_base_pod(dockerd.docker, work))
        phases.run("loadtest", stack.loadtest)
        phases.run("crash", stack.crash)
        phases.run("scale", stack.scale)
        phases.run("stop", stack.stop)
        phases.run("down", stack.down)
    finally:
        if phases.failed:
            print(stack.logs(), file=sys.stderr)
            stack.compose("down", "-v", "--remove-orphans", check=False)
        stack.host_server_stop()
        dockerd.stop()
        index.terminate()
        index.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(phases.summary())
    return 1 if phases.failed else 0


def start_engine(dockerd: PrivateDockerd, archive: Path) -> str:
    dockerd.start()
    import_images(archive, dockerd.docker)
    return dockerd.docker("version", "--format", "dockerd {{.Server.Version}}").stdout.strip()


def sample_images() -> Dict[str, bytes]:
    """A real photo (scikit-image's cat, JPEG) and the first Fashion-MNIST test image (PNG)."""
    from skimage import data

    photo = io.BytesIO()
    Image.fromarray(data.chelsea()).save(photo, format="JPEG", quality=90)
    return {"photo.jpg": photo.getvalue(), "fashion.png": fashion_pngs(1)[0]}


def top5(url: str, name: str, image: bytes) -> List[tuple]:
    response = httpx.post(f"{url}/predict?top_k=5", files=[("file", (name, image))], timeout=60)
    assert response.status_code == 200, response.text
    return [(p["label"], p["score"]) for p in response.json()["results"][0]["predictions"]]


class Stack:
    """The compose project under test, driven through docker-compose as a user would."""

    def __init__(self, dockerd: PrivateDockerd, work: Path, index_url: str):
        self.dockerd, self.work, self.index_url = dockerd, work, index_url
        self.host_server: Optional[ServerProcess] = None
        compose = shutil.which("docker-compose")
        self.command = [compose] if compose else ["docker", "compose"]

    def compose(self, *args: str, check: bool = True, env: Optional[Dict[str, str]] = None,
                timeout: float = 900) -> subprocess.CompletedProcess:
        command = [*self.command, "-p", PROJECT, "--project-directory", str(ROOT),
                   "-f", str(ROOT / "docker-compose.yml")]
        full_env = {**self.dockerd.env, "COMPOSE_DOCKER_CLI_BUILD": "0", "DOCKER_BUILDKIT": "0", **(env or {})}
        result = subprocess.run(command + list(args), env=full_env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def containers(self, service: str) -> List[str]:
        return self.compose("--profile", "scale", "ps", "-q", service).stdout.split()

    def inspect(self, container: str, template: str) -> str:
        return self.dockerd.docker("inspect", "--format", template, container).stdout.strip()

    def healthy(self, service: str, count: int = 1) -> bool:
        ids = self.containers(service)
        return len(ids) == count and all(self.inspect(c, "{{.State.Health.Status}}") == "healthy" for c in ids)

    def replica_served(self, container: str) -> float:
        """Predictions a replica answered, from its own /metrics (replicas publish no port)."""
        page = self.dockerd.docker("exec", container, "python", "-c", "import urllib.request; print(urllib.request"
                                   ".urlopen('http://127.0.0.1:8000/metrics').read().decode())").stdout
        try:
            return metric_value(page, PREDICTED)
        except KeyError:  # no request yet
            return 0.0

    def logs(self) -> str:
        return self.compose("--profile", "scale", "logs", "--no-color", "--tail", "40", check=False).stdout[-8000:]

    def host_server_stop(self) -> None:
        if self.host_server is not None:
            self.host_server.stop()

    # The phases, in order.

    def build(self) -> str:
        # The build runs in this namespace's network (build.network: host), where the index listens.
        offline = {"services": {s: {"build": {"network": "host"}} for s in ("api", "api-replica", "loadtest")}}
        (self.work / "build-network.json").write_text(json.dumps(offline))
        self.compose("-f", str(self.work / "build-network.json"), "--profile", "scale", "--profile", "loadtest",
                     "build", "--build-arg", f"PIP_INDEX_URL={self.index_url}",
                     "--build-arg", f"TORCH_INDEX_URL={self.index_url}", timeout=1800)
        image = json.loads(self.dockerd.docker("image", "inspect", "halonet-api:cpu").stdout)[0]
        assert image["Config"]["User"] == "10001", image["Config"]["User"]
        kernel = self.dockerd.docker("run", "--rm", "--network", "none", "halonet-api:cpu", "sh", "-c",
                                     "id -u; find $TORCH_EXTENSIONS_DIR -name '*.so'").stdout.split()
        assert kernel[0] == "10001" and any(k.endswith(".so") for k in kernel[1:]), kernel
        loadtest = json.loads(self.dockerd.docker("image", "inspect", "halonet-loadtest").stdout)[0]
        return (f"halonet-api:cpu {image['Size'] / 1e9:.2f} GB (PyPI's CUDA torch), "
                f"halonet-loadtest {loadtest['Size'] / 1e9:.2f} GB, kernel {Path(kernel[1]).name}")

    def up(self) -> str:
        self.host_server = ServerProcess({"HALO_THREADS": "1"})  # `make serve`, on the host's own .venv
        self.compose("up", "-d", "api")
        container = self.containers("api")[0]
        start_period = 60
        took = wait_until(lambda: self.healthy("api"), start_period, "api healthy")
        assert self.dockerd.docker("exec", container, "id", "-u").stdout.strip() == "10001"
        info = httpx.get(f"{API}/v1/model").json()
        assert info["attention_backends"] == ["cpp"], info["attention_backends"]
        # The image's compiled model (built by `python -m app --prepare`), found by the container's start.
        assert info["graph"] == "compiled" and info["compile_cached"], info
        assert "halo attention: cpp" in self.dockerd.docker("logs", container).stderr
        self.host_server.wait_ready()
        images = sample_images()
        for name, image in images.items():
            served, host = top5(API, name, image), top5(self.host_server.url, name, image)
            assert [label for label, _ in served] == [label for label, _ in host], (name, served, host)
            assert max(abs(a - b) for (_, a), (_, b) in zip(served, host)) < 1e-4, (name, served, host)
        response = httpx.post(f"{API}/predict?heatmaps=true", files=[("file", ("f.png", images["fashion.png"]))],
                              timeout=60)
        maps = response.json()["results"][0]["heatmaps"]
        assert response.status_code == 200 and abs(sum(map(sum, maps["image_map"])) - 1) < 1e-3, response.text[:500]
        served = read_metric(API, PREDICTED)
        assert served == 3, served
        return (f"healthy in {took:.0f} s (start period {start_period} s), the image's compiled model loaded in "
                f"{info['compile_seconds']:.1f} s, top-5 as on the host for both images")

    def loadtest(self) -> str:
        report = self.work / "loadtest-report"
        result = self.compose("--profile", "loadtest", "run", "--rm", "loadtest", timeout=300,
                              env={"LOADTEST_USERS": "8", "LOADTEST_DURATION": "15",
                                   "LOADTEST_REPORT_DIR": str(report)})
        counts = re.search(r"(\d+) requests, (\d+) failures", result.stdout)
        assert counts and int(counts[1]) > 0 and counts[2] == "0", result.stdout[-2000:]
        assert (report / "summary.md").is_file(), sorted(p.name for p in report.glob("*"))
        return f"{counts[1]} requests, 0 failures, report files: {len(list(report.iterdir()))}"

    def crash(self) -> str:
        container = self.containers("api")[0]
        restarts = int(self.inspect(container, "{{.RestartCount}}"))
        os.kill(int(self.inspect(container, "{{.State.Pid}}")), signal.SIGKILL)  # no shutdown, no drain
        restarted = wait_until(lambda: int(self.inspect(container, "{{.RestartCount}}")) > restarts, 60,
                               "api restarted by its policy")
        ready = wait_until(lambda: answers_200(f"{API}/readyz"), 120, "/readyz 200 again")
        return f"SIGKILL: restarted after {restarted:.1f} s, /readyz 200 {ready:.1f} s later"

    def scale(self) -> str:
        self.compose("--profile", "scale", "up", "-d", "--scale", "api-replica=2", timeout=300)
        wait_until(lambda: self.healthy("api-replica", 2) and self.healthy("lb"), 120, "2 replicas and nginx healthy")
        lb = self.containers("lb")[0]
        lb_started = self.inspect(lb, "{{.State.StartedAt}}")
        self.compose("--profile", "scale", "up", "-d", "--no-recreate", "--scale", "api-replica=3", timeout=300)
        wait_until(lambda: self.healthy("api-replica", 3), 120, "the third replica healthy")
        assert self.containers("lb") == [lb] and self.inspect(lb, "{{.State.StartedAt}}") == lb_started
        time.sleep(6)  # nginx's resolver caches the replicas' addresses for 5 s
        replicas = self.containers("api-replica")
        before = {r: self.replica_served(r) for r in replicas}
        outcomes = Burst(LB, clients=6, requests=25, images=shaded_pngs()).join()
        assert len(outcomes) == 150 and set(outcomes) == {200}, Burst.tally(outcomes)
        spread = {r[:12]: self.replica_served(r) - before[r] for r in replicas}
        assert all(n > 0 for n in spread.values()) and sum(spread.values()) >= 150, spread
        burst = Burst(LB, clients=6, requests=25, images=shaded_pngs())
        burst.wait_for(30)
        self.dockerd.docker("kill", replicas[0])
        killed = burst.join()
        assert len(killed) == 150 and set(killed) == {200}, Burst.tally(killed)
        return f"150 requests over 3 replicas {sorted(spread.values())}; one killed mid-burst: 150 x 200"

    def stop(self) -> str:
        # A model slow enough on this CPU that requests queue up: the drain has work to do.
        slow = {"HALO_MODEL": "halonet26t", "HALO_MAX_BATCH_SIZE": "1"}
        self.compose("up", "-d", "api", env=slow)
        wait_until(lambda: self.healthy("api"), 120, "api healthy on halonet26t")
        container = self.containers("api")[0]
        photo = sample_images()["photo.jpg"]
        burst = Burst(API, clients=48, requests=1, images=[photo])
        wait_until(lambda: read_metric(API, "halo_queue_depth") >= 8, 60,
                   "8 requests queued")
        queued = read_metric(API, "halo_queue_depth")
        start = time.monotonic()
        self.compose("stop", "api", env=slow, timeout=120)
        took = time.monotonic() - start
        outcomes = burst.join()
        answered = [o for o in outcomes if isinstance(o, int)]
        # Refused connections were never accepted (503: refused during the shutdown's grace period);
        # any other transport error is a request lost.
        assert set(outcomes) <= {200, 503, "ConnectError"}, Burst.tally(outcomes)
        assert len(answered) >= queued, (queued, Burst.tally(outcomes))
        exit_code = self.inspect(container, "{{.State.ExitCode}}")
        assert exit_code == "0", f"exit code {exit_code} (137: Docker's SIGKILL ended it before it drained)"
        return (f"{len(answered)} of 48 answered 200 ({queued:.0f} queued at the stop), "
                f"{48 - len(answered)} refused; stopped in {took:.1f} s, exit code {exit_code}")

    def down(self) -> str:
        self.compose("--profile", "scale", "--profile", "loadtest", "down", "-v", "--remove-orphans")
        label = f"label=com.docker.compose.project={PROJECT}"
        left = {kind: self.dockerd.docker(*command, "--filter", label, "-q").stdout.split()
                for kind, command in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                                      ("volumes", ["volume", "ls"]))}
        assert not any(left.values()), left
        return "no container, network or volume left"


if __name__ == "__main__":
    sys.exit(main())
