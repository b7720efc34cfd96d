"""Health, readiness, model info, metrics, request ids, errors, OpenAPI."""
import base64
import gc
import threading

import torch
from fastapi.testclient import TestClient

from app import service as service_module
from app.config import Settings
from app.engine import Engine
from app.main import MAX_REQUEST_ID_CHARS, create_app
from app.schemas import PredictOptions
from model.attention import compatible_backends

from .conftest import image_bytes, make_settings


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_before_the_model_is_loaded(random_compact_checkpoint, monkeypatch) -> None:
    """The loader is held on an event, so that "before" is observed every time, however quick it is."""
    loaded = threading.Event()
    real_engine = service_module.Engine

    def engine_once_released(settings: Settings) -> Engine:
        assert loaded.wait(120), "the test never released the loader"
        return real_engine(settings)

    monkeypatch.setattr(service_module, "Engine", engine_once_released)
    app = create_app(make_settings(random_compact_checkpoint))
    with TestClient(app) as fresh:
        try:
            early = fresh.get("/readyz")
            early_predict = fresh.post("/predict", files=[("file", ("a", image_bytes()))])
            early_v2 = fresh.get("/v2/health/ready")
        finally:
            loaded.set()
        loading = {"error": {"code": "not_ready", "message": "model is loading"}}
        assert early.status_code == 503 and early.json() == loading and early.headers["retry-after"] == "1"
        assert early_predict.status_code == 503 and early_predict.json() == loading
        assert early_v2.status_code == 503 and early_v2.json() == {"error": "model is loading"}
        assert app.state.service.wait_until_loaded(120), app.state.service.load_error
        assert fresh.get("/readyz").status_code == 200


def test_a_failed_load_is_said_in_readyz(tmp_path) -> None:
    """In the app; the server process then exits 1 (tests/reliability/test_process_faults.py)."""
    app = create_app(make_settings(tmp_path / "missing.safetensors"))
    with TestClient(app) as broken:
        app.state.service.wait_until_loaded(60)
        response = broken.get("/readyz")
        assert response.status_code == 503 and "does not exist" in response.json()["error"]["message"]
        assert broken.get("/healthz").status_code == 200


def test_what_start_up_made_is_out_of_the_collectors_sight_once_ready(client) -> None:
    """Full collections skip the model and everything else that lives as long as the process."""
    model = client.app.state.service.engine.model
    assert gc.get_freeze_count() > 0 and not any(o is model for o in gc.get_objects(generation=2))


def test_model_info(client) -> None:
    info = client.get("/v1/model").json()
    assert info["name"] == "halonet_compact" and len(info["classes"]) == 10 and info["input_size"] == [1, 32, 32]
    assert info["parameters"] > 0 and info["device"] == "cpu" and info["max_batch_size"] == 8 and info["threads"] == 1
    assert info["default_heatmap_layer"] == "stages.1.1.self_attn"
    # Weights from HALO_CHECKPOINT (random ones here): what they were trained on is not the service's to say.
    assert info["weights"] == "checkpoint" and info["trained_on"] is None
    assert info["preprocessing"].startswith("made grayscale") and "28x28" in info["preprocessing"]
    # float32 on the CPU: the C++ kernel where this machine builds it, else fused
    auto = "cpp" if "cpp" in compatible_backends(torch.zeros(1, 1, 32, 32)) else "fused"
    assert info["backend"] == "auto" and info["attention_backends"] == [auto]


def test_metrics_count_requests_and_batches(client) -> None:
    client.post("/predict", files=[("file", ("a", image_bytes()))])
    text = client.get("/metrics").text
    for name in ("halo_requests_total", "halo_request_seconds_bucket", "halo_queue_depth", "halo_queue_wait_seconds",
                 "halo_batch_size_bucket", "halo_inference_seconds", "halo_images_total"):
        assert name in text
    assert 'halo_requests_total{route="/predict",status="200"}' in text


def test_request_id_is_honoured_or_generated(client) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
    long_id = "trace-" + "0" * MAX_REQUEST_ID_CHARS
    echoed = client.get("/healthz", headers={"X-Request-ID": long_id}).headers["x-request-id"]
    assert echoed == long_id[:MAX_REQUEST_ID_CHARS]


def test_unknown_route_is_json_404(client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "http_error"


def test_a_wrong_method_is_json_405_saying_which_methods_are_allowed(client) -> None:
    for method, path, allowed in (("GET", "/predict", "POST"), ("POST", "/healthz", "GET"),
                                  ("DELETE", "/v1/model", "GET")):
        response = client.request(method, path)
        assert response.status_code == 405 and response.headers["allow"] == allowed
        assert response.json()["error"]["code"] == "http_error"


def test_openapi_documents_predict(client) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert client.get("/docs").status_code == 200


def test_openapi_requires_the_predict_body_and_at_least_one_file(client) -> None:
    body = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    multipart = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] is True
    assert multipart["required"] == ["file"] and multipart["properties"]["file"]["minItems"] == 1
    assert body["content"]["application/json"]["schema"]["required"] == ["images"]


def test_openapi_documents_the_query_options_of_a_multipart_predict(client) -> None:
    parameters = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["parameters"]
    assert {p["name"] for p in parameters if p["in"] == "query"} == set(PredictOptions.model_fields)


def test_openapi_json_example_is_an_image_the_service_classifies(client) -> None:
    request_schema = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    example = request_schema["application/json"]["schema"]["properties"]["images"]["examples"][0]
    response = client.post("/predict", json={"images": example})
    assert response.status_code == 200 and len(response.json()["results"]) == 1


def test_openapi_documents_metrics_as_the_text_it_is(client) -> None:
    documented = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(documented) == {"text/plain"}
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_openapi_documents_every_status_of_each_route_with_the_error_body_sent(client) -> None:
    spec = client.get("/openapi.json").json()
    documented = {path: {method: set(operation["responses"]) for method, operation in item.items()}
                  for path, item in spec["paths"].items()}
    model, version = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    v2_model, v2_infer = {"get": {"200", "404", "503"}}, {"post": {"200", "400", "404", "408", "413", "415", "422",
                                                                  "500", "503", "504"}}
    assert documented == {
        "/healthz": {"get": {"200"}}, "/readyz": {"get": {"200", "503"}}, "/metrics": {"get": {"200"}},
        "/v1/model": {"get": {"200", "503"}},
        "/predict": {"post": {"200", "400", "408", "413", "415", "422", "500", "503", "504"}},
        "/v2": {"get": {"200"}}, "/v2/health/live": {"get": {"200"}}, "/v2/health/ready": {"get": {"200", "503"}},
        model: v2_model, f"{model}/ready": v2_model, version: v2_model, f"{version}/ready": v2_model,
        f"{model}/infer": v2_infer, f"{version}/infer": v2_infer}
    for path, item in spec["paths"].items():
        error_body = "V2Error" if path.startswith("/v2") else "ErrorResponse"
        for operation in item.values():
            for status, response in operation["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": f"#/components/schemas/{error_body}"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 body, which is never sent


def test_json_options_are_typed_as_documented_and_query_options_are_read_from_text(client) -> None:
    image = base64.b64encode(image_bytes()).decode()
    for loose in ({"heatmaps": 0}, {"top_k": "3"}, {"heatmaps": "true"}):
        response = client.post("/predict", json={"images": [image], **loose})
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", loose
    multipart = client.post("/predict?top_k=3&heatmaps=false", files=[("file", ("a", image_bytes()))])
    assert multipart.status_code == 200 and len(multipart.json()["results"][0]["predictions"]) == 3


def test_an_unexpected_failure_of_predict_is_a_json_500_and_the_next_request_is_served(client, monkeypatch) -> None:
    pipeline = client.app.state.service.pipeline

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "predict", broken)
        response = client.post("/predict", files=[("file", ("a", image_bytes()))])
    assert response.status_code == 500 and response.json()["error"] == {"code": "internal_error",
                                                                         "message": "RuntimeError: a bug"}
    assert response.headers["x-request-id"]
    assert 'halo_requests_total{route="/predict",status="500"}' in client.get("/metrics").text
    assert client.post("/predict", files=[("file", ("a", image_bytes()))]).status_code == 200
