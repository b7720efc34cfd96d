"""POST /predict through the ASGI app: every input kind and format, options, heatmaps, errors."""
import base64
import io
import math

import pytest
from PIL import Image

from app.schemas import PredictResponse

from .conftest import image_bytes

def _multipart(*files: bytes):
    return [("file", (f"img{i}", data, "application/octet-stream")) for i, data in enumerate(files)]


def _check_predictions(result: dict, top_k: int) -> None:
    predictions = result["predictions"]
    assert len(predictions) == top_k
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert len({p["index"] for p in predictions}) == top_k
    assert result["timing"]["batch_size"] >= 1 and result["timing"]["inference_ms"] > 0


@pytest.mark.parametrize("fmt", ["BMP", "JPEG", "PNG", "TIFF", "WEBP"])
def test_every_still_format_in_multipart(client, fmt: str) -> None:
    response = client.post("/predict?top_k=3", files=_multipart(image_bytes(fmt)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "halonet_compact" and len(body["version"]) == 12
    _check_predictions(body["results"][0], 3)


def test_gif_first_frame(client) -> None:
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    response = client.post("/predict", files=_multipart(buffer.getvalue()))
    assert response.status_code == 200, response.text


def test_all_probabilities_sum_to_one(client) -> None:
    response = client.post("/predict?top_k=10", files=_multipart(image_bytes()))
    assert math.isclose(sum(p["score"] for p in response.json()["results"][0]["predictions"]), 1.0, abs_tol=1e-5)


def test_several_images_in_one_multipart_request(client) -> None:
    files = [image_bytes("PNG", color=(255, 255, 255)), image_bytes("JPEG", color=(0, 0, 0)), image_bytes("BMP")]
    body = client.post("/predict?top_k=2", files=_multipart(*files)).json()
    assert len(body["results"]) == 3
    for result in body["results"]:
        _check_predictions(result, 2)


def test_json_base64_request_with_options(client) -> None:
    images = [base64.b64encode(image_bytes(fmt)).decode() for fmt in ("PNG", "WEBP")]
    response = client.post("/predict", json={"images": images, "top_k": 4})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2 and all(len(r["predictions"]) == 4 for r in results)


def test_same_image_same_answer_either_way(client) -> None:
    data = image_bytes("PNG", color=(10, 200, 90))
    multipart = client.post("/predict?top_k=10", files=_multipart(data)).json()["results"][0]["predictions"]
    as_json = client.post("/predict", json={"images": [base64.b64encode(data).decode()], "top_k": 10})
    assert multipart == as_json.json()["results"][0]["predictions"]


def test_heatmaps_as_arrays(client) -> None:
    response = client.post("/predict?heatmaps=true", files=_multipart(image_bytes()))
    heatmaps = response.json()["results"][0]["heatmaps"]
    assert heatmaps["layer"] == "stages.1.1.self_attn"  # the last layer with at least 2x2 blocks
    assert heatmaps["feature_size"] == [8, 8] and heatmaps["image_size"] == [32, 32] and heatmaps["blocks"] == [2, 2]
    assert len(heatmaps["windows"]) == 4 and len(heatmaps["block_maps"]) == 4
    for grid in heatmaps["block_maps"]:
        assert len(grid) == 6 and len(grid[0]) == 6  # block 4 + halo 1 on each side
        assert math.isclose(sum(map(sum, grid)), 1.0, abs_tol=1e-4)
    image_map = heatmaps["image_map"]
    assert len(image_map) == 32 and len(image_map[0]) == 32
    assert math.isclose(sum(map(sum, image_map)), 1.0, abs_tol=1e-4)
    assert heatmaps["windows"][3] == dict(block_row=1, block_col=1, feature_top=3, feature_left=3, feature_size=6,
                                          image_top=12.0, image_left=12.0, image_size=24.0)


def test_heatmaps_as_pngs_of_the_stated_sizes(client) -> None:
    response = client.post("/predict", json={"images": [base64.b64encode(image_bytes()).decode()],
                                              "heatmaps": True, "heatmap_format": "png",
                                              "heatmap_layer": "stages.0.1.self_attn"})
    heatmaps = response.json()["results"][0]["heatmaps"]
    assert "block_maps" not in heatmaps
    overlay = Image.open(io.BytesIO(base64.b64decode(heatmaps["overlay_png"])))
    mosaic = Image.open(io.BytesIO(base64.b64decode(heatmaps["mosaic_png"])))
    assert overlay.size == (40, 60) and overlay.format == "PNG"  # the image sent, not the 32 x 32 input
    assert heatmaps["blocks"] == [4, 4] and mosaic.size == (4 * (6 * 11 + 3) + 3,) * 2  # windows of 66 px


def test_heatmaps_say_where_the_input_lies_in_the_image_sent_and_draw_on_it(client) -> None:
    """A JPEG large enough to be decoded at a reduced scale: the mapping is in the file's own pixels,
    the overlay is the image at heatmap_max_side."""
    photo = image_bytes("JPEG", size=(1200, 600))
    array = client.post("/predict?heatmaps=true", files=[("file", ("p.jpg", photo))]).json()
    mapping = array["results"][0]["heatmaps"]["mapping"]
    assert mapping["original_size"] == [1200, 600] and mapping["placed"] == [2.0, 9.0, 30.0, 23.0]
    assert mapping["crop"] == [0.0, 0.0, 1200.0, 600.0]  # one colour: nothing stands out, the whole image fits
    png = client.post("/predict?heatmaps=true&heatmap_format=png&heatmap_max_side=300",
                      files=[("file", ("p.jpg", photo))]).json()["results"][0]["heatmaps"]
    assert Image.open(io.BytesIO(base64.b64decode(png["overlay_png"]))).size == (300, 150)
    assert png["mapping"] == mapping
    # Larger than the reduced decode (600 x 300): the picture is decoded again, the model's input is not.
    large = client.post("/predict?heatmaps=true&heatmap_format=png&heatmap_max_side=1000",
                        files=[("file", ("p.jpg", photo))]).json()["results"][0]
    assert Image.open(io.BytesIO(base64.b64decode(large["heatmaps"]["overlay_png"]))).size == (1000, 500)
    assert large["predictions"] == array["results"][0]["predictions"]


@pytest.mark.parametrize("query", ["top_k=2", "heatmaps=true", "heatmaps=true&heatmap_format=png"])
def test_responses_follow_the_documented_schema(client, query: str) -> None:
    body = client.post(f"/predict?{query}", files=_multipart(image_bytes(), image_bytes("JPEG"))).json()
    assert PredictResponse.model_validate(body).model_dump(exclude_none=True) == body


def test_requests_without_heatmaps_carry_none(client) -> None:
    assert "heatmaps" not in client.post("/predict", files=_multipart(image_bytes())).json()["results"][0]


@pytest.mark.parametrize("query,fragment", [
    ("top_k=0", "top_k"), ("top_k=11", "at most 10"), ("top_k=three", "top_k"),
    ("heatmap_format=jpeg&heatmaps=true", "heatmap_format"),
    ("heatmaps=true&heatmap_layer=stem", "not a halo attention layer"),
])
def test_bad_options_are_422(client, query: str, fragment: str) -> None:
    response = client.post(f"/predict?{query}", files=_multipart(image_bytes()))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_options" and fragment in response.json()["error"]["message"]


@pytest.mark.parametrize("files,status,code", [
    ([bytes(range(256))], 400, "undecodable_image"),  # binary noise
    ([b"not an image at all"], 415, "unsupported_image_format"),  # text: recognisably another kind
    ([b""], 400, "empty_image"),
    ([image_bytes("PNG")[:60]], 400, "undecodable_image"),
    ([image_bytes("ICO", size=(32, 32))], 415, "unsupported_image_format"),
    ([image_bytes("PNG", size=(1200, 1000), mode="L")], 413, "image_too_large"),  # 1.2 MP > 1 MP limit
])
def test_bad_images(client, files, status: int, code: str) -> None:
    response = client.post("/predict", files=_multipart(*files))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_decompression_bomb_is_refused_from_its_header(client) -> None:
    bomb = image_bytes("PNG", size=(20000, 20000), mode="1")  # 400 MP of zeros compresses to kilobytes
    assert len(bomb) < 200_000
    response = client.post("/predict", files=_multipart(bomb))
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"
    assert "20000x20000" in response.json()["error"]["message"]
    assert "HALO_MAX_PIXELS=1000000" in response.json()["error"]["message"]  # the service's limit, not Pillow's


def test_one_bad_image_fails_its_request_only(client) -> None:
    response = client.post("/predict", files=_multipart(image_bytes(), b"\x00garbage\xff"))
    assert response.status_code == 400 and "image 1" in response.json()["error"]["message"]
    assert client.post("/predict", files=_multipart(image_bytes())).status_code == 200


def test_body_over_the_limit_is_413(client) -> None:
    response = client.post("/predict", content=b"x" * 2_000_001, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("content_type", ["text/plain", "image/png", ""])
def test_unsupported_media_type_is_415(client, content_type: str) -> None:
    response = client.post("/predict", content=image_bytes(), headers={"content-type": content_type})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("payload,status", [
    ({"images": []}, 422), ({"pictures": ["x"]}, 422), ({"images": ["!!!notbase64"]}, 400), ({"images": [5]}, 422),
])
def test_bad_json_bodies(client, payload: dict, status: int) -> None:
    assert client.post("/predict", json=payload).status_code == status


def test_invalid_json_syntax_is_422(client) -> None:
    response = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_one_image_over_the_limit_is_413_in_either_form(client) -> None:
    limit = client.app.state.service.settings.max_images_per_request
    image = image_bytes()
    multipart = client.post("/predict", files=_multipart(*[image] * (limit + 1)))
    as_json = client.post("/predict", json={"images": [base64.b64encode(image).decode()] * (limit + 1)})
    # The form parser stops at the first file past the limit; a JSON body's images are counted.
    for response, count in ((multipart, f"over {limit}"), (as_json, str(limit + 1))):
        assert response.status_code == 413, response.text
        assert response.json()["error"] == {"code": "too_many_images",
                                            "message": f"{count} images in one request; the limit is {limit}"}
    assert client.post("/predict", files=_multipart(*[image] * limit)).status_code == 200


def test_a_form_of_text_fields_is_413(client) -> None:
    limit = client.app.state.service.settings.max_images_per_request
    fields = {f"note{i}": "x" for i in range(limit + 1)}
    response = client.post("/predict", data=fields, files=_multipart(image_bytes()))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_fields"


def test_multipart_without_files_is_422(client) -> None:
    response = client.post("/predict", data={"other": "x"}, files=[("unrelated", ("a", b"b"))])
    assert response.status_code == 422 and response.json()["error"]["code"] == "no_images"


def test_options_in_the_query_of_a_json_request_are_422(client) -> None:
    response = client.post("/predict?top_k=2", json={"images": [base64.b64encode(image_bytes()).decode()]})
    assert response.status_code == 422 and "not in the query (top_k)" in response.json()["error"]["message"]


def test_an_overloaded_service_refuses_before_reading_the_body(client, monkeypatch) -> None:
    """The admission decides from the queue alone: this body would be a 422 if it were read."""
    monkeypatch.setattr(client.app.state.service.batcher, "expected_wait_s", lambda images: 60.0)
    response = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
    assert int(response.headers["retry-after"]) == 55  # what the wait is over HALO_MAX_QUEUE_WAIT_MS (5 s)
