"""The Open Inference Protocol's routes in-process: the wire forms a client may send (JSON, binary
tensor data, compressed bodies), the protocol's error form with /predict's statuses and limits, and
the docs. The answers themselves are compared with /predict through real clients in
tests/integration/test_v2_clients.py."""
import base64
import gzip
import json
import struct
import zlib
from typing import List, Optional

import numpy as np
import pytest

from tests.api.conftest import image_bytes

INFER = "/v2/models/halonet_compact/infer"
PNG = image_bytes()


def images_input(*files: bytes) -> dict:
    return {"name": "images", "datatype": "BYTES", "shape": [len(files)],
            "data": [base64.b64encode(f).decode() for f in files]}


def binary_body(header: dict, *blobs: bytes) -> tuple:
    encoded = json.dumps(header).encode()
    return encoded + b"".join(blobs), {"Inference-Header-Content-Length": str(len(encoded))}


def bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def outputs_of(response) -> dict:
    """name -> numpy array, for JSON and binary responses alike."""
    length = response.headers.get("inference-header-content-length")
    header = json.loads(response.content[:int(length)] if length else response.content)
    arrays, offset = {}, int(length or 0)
    for out in header["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.array(out["data"]).reshape(out["shape"])
        elif out["datatype"] == "FP32":
            arrays[out["name"]] = np.frombuffer(response.content[offset:offset + size], "<f4").reshape(out["shape"])
        else:
            blob, items = response.content[offset:offset + size], []
            while blob:
                (n,) = struct.unpack_from("<I", blob)
                items.append(blob[4:4 + n].decode())
                blob = blob[4 + n:]
            arrays[out["name"]] = np.array(items).reshape(out["shape"])
        offset += size or 0
    return arrays


def v2_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and fragment in body["error"], body


def test_json_and_binary_requests_and_responses_agree(client) -> None:
    as_json = client.post(INFER, json={"inputs": [images_input(PNG, PNG)], "id": "r1"})
    header = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": len(bytes_elements(PNG, PNG))}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    body, headers = binary_body(header, bytes_elements(PNG, PNG))
    as_binary = client.post(INFER, content=body, headers=headers)
    assert as_json.headers["content-type"] == "application/json" and as_json.json()["id"] == "r1"
    assert as_binary.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(outputs_of(as_json)["probabilities"], outputs_of(as_binary)["probabilities"], atol=1e-6)
    assert outputs_of(as_json)["probabilities"].shape == (2, 10)


def test_binary_data_output_sends_every_output_after_the_header_unless_one_says_otherwise(client) -> None:
    response = client.post(INFER, json={"inputs": [images_input(PNG)], "parameters": {"binary_data_output": True},
                                        "outputs": [{"name": "probabilities"},
                                                    {"name": "heatmaps", "parameters": {"binary_data": False}}]})
    header = json.loads(response.content[:int(response.headers["inference-header-content-length"])])
    assert [("data" in o, "parameters" in o) for o in header["outputs"]] == [(False, True), (True, False)]
    assert outputs_of(response)["heatmaps"].shape == (1, 4, 6, 6)


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_requests_are_read(client, encoding: str, compress) -> None:
    body = json.dumps({"inputs": [images_input(PNG)]}).encode()
    response = client.post(INFER, content=compress(body), headers={"Content-Encoding": encoding})
    assert response.status_code == 200, response.text


def test_the_versioned_routes_answer_for_the_served_version_only(client) -> None:
    version = client.get("/v2/models/halonet_compact").json()["versions"][0]
    base = f"/v2/models/halonet_compact/versions/{version}"
    assert client.get(base).json()["versions"] == [version]
    assert client.get(f"{base}/ready").json() == {"name": "halonet_compact", "ready": True}
    assert client.post(f"{base}/infer", json={"inputs": [images_input(PNG)]}).status_code == 200
    v2_error(client.post("/v2/models/halonet_compact/versions/7/infer", json={}), 404, version)


def test_a_timeout_parameter_shortens_the_deadline(client) -> None:
    response = client.post(INFER, json={"inputs": [images_input(PNG)], "parameters": {"timeout": 1}})
    v2_error(response, 504, "deadline")


def header_only(inputs: List[dict], outputs: Optional[List[dict]] = None) -> dict:
    return {"json": {"inputs": inputs, **({"outputs": outputs} if outputs is not None else {})}}


PIXELS = {"name": "pixels", "datatype": "FP32", "shape": [1, 1, 32, 32]}
BAD_REQUESTS = {
    "not JSON": ({"content": b"{inputs", "headers": {}}, 400, "not valid JSON"),
    "no inputs": ({"json": {"inputs": []}}, 422, "inputs"),
    "shape not integers": (header_only([{**images_input(PNG), "shape": ["1"]}]), 422, "shape"),
    "two inputs": (header_only([images_input(PNG), images_input(PNG)]), 422, "send one input"),
    "unknown input": (header_only([{**images_input(PNG), "name": "x"}]), 422, "send one input"),
    "images as FP32": (header_only([{**PIXELS, "name": "images", "shape": [1], "data": [1.0]}]), 422, "BYTES"),
    "unread datatype": (header_only([{**PIXELS, "datatype": "INT8", "data": [0] * 1024}]), 422, "INT8"),
    "wrong pixel size": (header_only([{**PIXELS, "shape": [1, 1, 28, 28], "data": [0] * 784}]), 422, "32, 32"),
    "count off its shape": (header_only([{**images_input(PNG), "shape": [2]}]), 422, "holds 2 elements"),
    "no image": (header_only([{**images_input(), "shape": [0]}]), 422, "no image"),
    "no data": (header_only([{"name": "images", "datatype": "BYTES", "shape": [1]}]), 422, "neither data"),
    "not base64": (header_only([{**images_input(PNG), "data": ["***"]}]), 400, "base64"),
    "not an image": (header_only([images_input(b"plain text, no picture")]), 415, "image"),
    "empty image": (header_only([images_input(b"")]), 400, "empty"),
    "too many images": (header_only([images_input(*[PNG] * 65)]), 413, "65 images"),
    "unknown output": (header_only([images_input(PNG)], [{"name": "logits"}]), 422, "logits"),
    "output twice": (header_only([images_input(PNG)], [{"name": "heatmaps"}] * 2), 422, "asked twice"),
    "top k over the classes": (header_only([images_input(PNG)], [
        {"name": "probabilities", "parameters": {"classification": 11}}]), 422, "at most 10"),
    "classification of heatmaps": (header_only([images_input(PNG)], [
        {"name": "heatmaps", "parameters": {"classification": 2}}]), 422, "classification applies"),
    "unknown heatmap layer": (header_only([images_input(PNG)], [
        {"name": "heatmaps", "parameters": {"heatmap_layer": "head.fc"}}]), 422, "not a halo attention layer"),
    "shared memory": (header_only([images_input(PNG)], [
        {"name": "probabilities", "parameters": {"shared_memory_region": "r"}}]), 400, "shared-memory"),
    "unknown encoding": ({"content": b"x", "headers": {"Content-Encoding": "br"}}, 415, "br"),
    "a bomb": ({"content": gzip.compress(b" " * 3_000_000), "headers": {"Content-Encoding": "gzip"}}, 413,
               "decompressed"),
}


@pytest.mark.parametrize("send, status, fragment", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_the_status_of_predict_in_the_protocols_error_form(client, send, status, fragment) -> None:
    v2_error(client.post(INFER, **send), status, fragment)


def binary_request(datatype: str, shape: List[int], blob: bytes, declared: Optional[int] = None,
                   extra: bytes = b"") -> tuple:
    size = len(blob) if declared is None else declared
    return binary_body({"inputs": [{"name": "pixels" if datatype == "FP32" else "images", "datatype": datatype,
                                    "shape": shape, "parameters": {"binary_data_size": size}}]}, blob, extra)


BAD_BINARY = {
    "size past the body": (binary_request("BYTES", [1], bytes_elements(PNG), declared=10 ** 6), "does not fit"),
    "bytes left over": (binary_request("BYTES", [1], bytes_elements(PNG), extra=b"\0\0"), "belong to no input"),
    "element length cut off": (binary_request("BYTES", [1], bytes_elements(PNG) + b"\1\0"), "cut off"),
    "element longer than the data": (binary_request("BYTES", [1], struct.pack("<I", 99) + b"ab"), "says 99 bytes"),
    "FP32 of odd length": (binary_request("FP32", [1, 1, 32, 32], b"\0" * 4095), "whole FP32"),
}


@pytest.mark.parametrize("request_, fragment", BAD_BINARY.values(), ids=BAD_BINARY.keys())
def test_broken_binary_tensor_data_is_400(client, request_, fragment) -> None:
    body, headers = request_
    v2_error(client.post(INFER, content=body, headers=headers), 400, fragment)


@pytest.mark.parametrize("length", ["0", "-3", "abc", "99999999"])
def test_a_header_length_that_cannot_be_is_400(client, length: str) -> None:
    v2_error(client.post(INFER, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": length}),
             400, "Inference-Header-Content-Length")


def test_pixels_that_are_not_finite_are_refused(client) -> None:
    batch = np.zeros((1, 1, 32, 32), dtype="<f4")
    batch[0, 0, 3, 4] = np.nan
    body, headers = binary_request("FP32", [1, 1, 32, 32], batch.tobytes())
    v2_error(client.post(INFER, content=body, headers=headers), 422, "NaN")


def test_model_routes_name_the_model_they_serve(client) -> None:
    v2_error(client.get("/v2/models/resnet50"), 404, "halonet_compact")
    v2_error(client.get("/v2/models/resnet50/ready"), 404, "halonet_compact")
    v2_error(client.post("/v2/models/resnet50/infer", json={"inputs": [images_input(PNG)]}), 404, "halonet_compact")


def test_unknown_routes_and_methods_answer_in_the_protocols_form(client) -> None:
    v2_error(client.get("/v2/repository/index"), 404, "Not Found")
    response = client.get(INFER)
    v2_error(response, 405, "Method Not Allowed")
    assert response.headers["allow"] == "POST"


def test_health_and_server_metadata(client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "halonet-serve"


def test_openapi_documents_every_v2_route(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    model, version = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    assert {p for p in paths if p.startswith("/v2")} == {
        "/v2", "/v2/health/live", "/v2/health/ready", model, f"{model}/ready", f"{model}/infer",
        version, f"{version}/ready", f"{version}/infer"}
    body = paths[f"{model}/infer"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
    assert "$ref" not in json.dumps(body)  # the request schema written out: OpenAPI has no $defs to point into
