"""The Open Inference Protocol against a real uvicorn server, through the clients people use with it:
tritonclient.http (binary tensor data by default, JSON on request, the classification extension)
and KServe's InferenceRESTClient. Each answer is compared with /predict's for the same images."""
import asyncio
import base64
import io
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from benchmarks.server import ROOT, ServerProcess, read_metric
from model import create_model
from model.decoding import load_image
from model.transforms import build_transform
from tests.integration.test_server import distinct_images

pytestmark = pytest.mark.slow
MODEL = "halonet_compact"  # the shipped default, so labels and scores are the real ones


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess({"HALO_THREADS": "1"})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield triton_client
    triton_client.close()


IMAGES = distinct_images(3)


def predict(url: str, images: List[bytes], top_k: int = 10, heatmaps: bool = False) -> List[dict]:
    response = httpx.post(f"{url}/predict", json={"images": [base64.b64encode(i).decode() for i in images],
                                                 "top_k": top_k, "heatmaps": heatmaps}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def probabilities(results: List[dict]) -> np.ndarray:
    """/predict's answers at top_k = every class, back into (N, classes) rows."""
    rows = np.zeros((len(results), len(results[0]["predictions"])), dtype=np.float32)
    for row, result in zip(rows, results):
        for p in result["predictions"]:
            row[p["index"]] = p["score"]
    return rows


def pixels(images: List[bytes]) -> np.ndarray:
    """What a client that preprocesses itself sends: the model's own transform, as float32 NCHW."""
    transform = build_transform(create_model(MODEL).pretrained_cfg)
    return np.stack([transform(load_image(i)).numpy() for i in images]).astype(np.float32)


def bytes_input(images: List[bytes], binary: bool) -> triton.InferInput:
    """Image files as a BYTES input: raw in binary form; base64 strings in JSON, which carries only text."""
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(i) for i in images]
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def test_health_readiness_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("resnet50")
    assert set(client.get_server_metadata()["extensions"]) >= {"binary_tensor_data", "classification"}
    metadata = client.get_model_metadata(MODEL)
    version = metadata["versions"][0]
    assert client.is_model_ready(MODEL, version) and not client.is_model_ready(MODEL, "no-such-version")
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("images", "BYTES", (-1,)), ("pixels", "FP32", (-1, 1, 32, 32))}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["outputs"]} == {
        ("probabilities", "FP32", (-1, 10)), ("heatmaps", "FP32", (-1, 4, 6, 6))}
    with pytest.raises(InferenceServerException, match="resnet50"):
        client.get_model_metadata("resnet50")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_images_give_the_probabilities_of_predict(server, client, binary: bool) -> None:
    result = client.infer(MODEL, [bytes_input(IMAGES, binary)],
                          outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, probabilities(predict(server.url, IMAGES)), rtol=0, atol=1e-6)
    assert result.get_response()["model_name"] == MODEL


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_pixels_give_the_probabilities_of_predict(server, client, binary: bool) -> None:
    batch = pixels(IMAGES)
    tensor = triton.InferInput("pixels", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    probs = client.infer(MODEL, [tensor], model_version="", outputs=[
        triton.InferRequestedOutput("probabilities", binary_data=binary)]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, probabilities(predict(server.url, IMAGES)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_classification_extension_gives_the_top_k_of_predict(server, client, binary: bool) -> None:
    result = client.infer(MODEL, [bytes_input(IMAGES, binary=True)], outputs=[
        triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 3)
    for row, expected in zip(top, predict(server.url, IMAGES, top_k=3)):
        parsed = [entry.decode().split(":", 2) if isinstance(entry, bytes) else entry.split(":", 2) for entry in row]
        expected_top = [(p["index"], p["label"]) for p in expected["predictions"]]
        assert [(int(i), label) for _, i, label in parsed] == expected_top
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], [p["score"] for p in expected["predictions"]],
                                   rtol=0, atol=1e-6)


def test_heatmaps_are_an_output_asked_for_by_name(server, client) -> None:
    result = client.infer(MODEL, [bytes_input(IMAGES, binary=True)], outputs=[
        triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("heatmaps")])
    maps = result.as_numpy("heatmaps")
    expected = [r["heatmaps"]["block_maps"] for r in predict(server.url, IMAGES, heatmaps=True)]
    assert maps.shape == (3, 4, 6, 6)
    np.testing.assert_allclose(maps, np.array(expected, dtype=np.float32), rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1, atol=1e-5)  # each block's window is a distribution


def test_errors_reach_the_client_with_their_status_and_message(client) -> None:
    wrong_size = triton.InferInput("pixels", [1, 1, 28, 28], "FP32")
    wrong_size.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"\[N, 1, 32, 32\]") as caught:
        client.infer(MODEL, [wrong_size])
    assert caught.value.status() == "422"
    with pytest.raises(InferenceServerException, match="image 1") as caught:
        client.infer(MODEL, [bytes_input([IMAGES[0], b"not an image at all"], binary=True)])
    assert caught.value.status() in ("400", "415")


def test_kserve_rest_client(server: ServerProcess) -> None:
    expected = probabilities(predict(server.url, IMAGES))

    async def run() -> Dict[str, np.ndarray]:
        kserve = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            assert await kserve.is_server_ready(server.url)
            assert await kserve.is_server_live(server.url)
            assert await kserve.is_model_ready(server.url, MODEL)
            images = InferInput("images", [len(IMAGES)], "BYTES")
            images.set_data_from_numpy(np.array(IMAGES, dtype=np.object_), binary_data=True)
            batch = pixels(IMAGES)
            tensor = InferInput("pixels", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=False)
            answers = {}
            for name, given in (("images", images), ("pixels", tensor)):
                response = await kserve.infer(server.url, InferRequest(MODEL, [given]), model_name=MODEL)
                answers[name] = response.outputs[0].as_numpy()
            return answers
        finally:
            await kserve.close()

    for name, probs in asyncio.run(run()).items():
        np.testing.assert_allclose(probs.reshape(expected.shape), expected, rtol=0, atol=1e-6, err_msg=name)


def test_the_readme_snippet_runs(server: ServerProcess, tmp_path: Path, monkeypatch, capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("### KServe / Triton clients", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "a.png").write_bytes(IMAGES[0])
    (tmp_path / "b.jpg").write_bytes(IMAGES[1])  # a PNG under another name: the service reads what it is
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("localhost:8000", server.url.removeprefix("http://")), {})
    assert capsys.readouterr().out.count(":") == 6  # three "score:index:label"


def slow_to_decode_image() -> bytes:
    """A 6000 x 6000 PNG of few bytes (a repeating gradient) that takes about half a second to decode."""
    buffer = io.BytesIO()
    Image.fromarray((np.add.outer(np.arange(6000), np.arange(6000)) % 251).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_v2_and_predict_requests_share_forward_passes(start_server) -> None:
    """/predict sends an image that is slow to decode; once the server counts it in flight, a v2
    request sends a small one. The batcher waits for the image on its way (its window is long), so
    both go through one forward of 2: /predict's timing and the server's metrics say so."""
    url = start_server(HALO_MAX_BATCH_SIZE="2", HALO_MAX_WAIT_MS="5000", HALO_BATCH_POLICY="fixed").url
    answers: Dict[str, object] = {}
    thread = threading.Thread(target=lambda: answers.update(predict=predict(url, [slow_to_decode_image()])))
    thread.start()
    deadline = time.monotonic() + 30
    while read_metric(url, "halo_images_in_flight") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    v2_client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    probs = v2_client.infer(MODEL, [bytes_input(IMAGES[:1], binary=True)]).as_numpy("probabilities")
    thread.join(60)
    assert probs.shape == (1, 10)
    assert answers["predict"][0]["timing"]["batch_size"] == 2
    assert read_metric(url, "halo_batch_size_count") == 1  # one forward pass served both requests
    assert read_metric(url, "halo_images_in_flight") == 0
