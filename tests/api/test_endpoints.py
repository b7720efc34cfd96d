"""Health, readiness, model info, metrics, request ids, OpenAPI."""
import gc

from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import image_bytes, make_settings


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_before_the_model_is_loaded(random_compact_checkpoint) -> None:
    app = create_app(make_settings(random_compact_checkpoint))
    with TestClient(app) as fresh:
        service = app.state.service
        early = fresh.get("/readyz")
        early_predict = fresh.post("/predict", files=[("file", ("a", image_bytes()))])
        service.wait_until_loaded(120)
        if early.status_code == 503:  # the loader thread may be quick: only then is "before" observable
            assert early.json()["error"]["code"] == "not_ready" and early.headers["retry-after"] == "1"
            assert early_predict.status_code == 503
        assert fresh.get("/readyz").status_code == 200


def test_failed_load_keeps_the_process_up_and_says_why(tmp_path) -> None:
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
    assert info["backend"] == "auto" and info["attention_backends"] == ["cpp"]  # float32 on the CPU


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


def test_unknown_route_is_json_404(client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "http_error"


def test_openapi_documents_predict(client) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert client.get("/docs").status_code == 200


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
