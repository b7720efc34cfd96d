"""Against real uvicorn processes: batching, isolation of results, backpressure, deadlines, SIGTERM."""
import io
import signal
import threading
import time
from typing import List

import httpx
import pytest
import torch
from PIL import Image

from model import create_model
from model.transforms import build_transform

pytestmark = pytest.mark.slow


def distinct_images(n: int) -> List[bytes]:
    """n different images: a bar whose height, position and brightness vary with i."""
    images = []
    for i in range(n):
        image = Image.new("L", (28, 28), 0)
        image.paste(60 + 12 * i, (4 + i % 8, 2 + i % 5, 12 + i % 11, 26 - i % 7))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def post_all(url: str, files: List[bytes], query: str = "top_k=10") -> List[httpx.Response]:
    """One request per image, all at once from threads (each its own connection)."""
    responses: List[httpx.Response] = [None] * len(files)

    def send(i: int) -> None:
        responses[i] = httpx.post(f"{url}/predict?{query}", files=[("file", ("x.png", files[i]))], timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(files))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_concurrent_requests_share_forward_passes_and_keep_their_own_answers(
        start_server, random_compact_checkpoint):
    server = start_server(
        HALO_CHECKPOINT=str(random_compact_checkpoint), HALO_MAX_BATCH_SIZE="16", HALO_MAX_WAIT_MS="50")
    images = distinct_images(16)
    before = server.metric("halo_batch_size_count")
    responses = post_all(server.url, images)
    passes = server.metric("halo_batch_size_count") - before
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert passes < len(images)
    assert max(r.json()["results"][0]["timing"]["batch_size"] for r in responses) > 1

    model = create_model("halonet_compact", checkpoint=random_compact_checkpoint).eval()
    transform = build_transform(model.pretrained_cfg)
    for data, response in zip(images, responses):
        with torch.no_grad():
            expected = model(transform(Image.open(io.BytesIO(data)))[None]).softmax(-1)[0]
        for prediction in response.json()["results"][0]["predictions"]:
            assert abs(prediction["score"] - expected[prediction["index"]].item()) <= 1e-5


def test_a_corrupt_image_in_a_burst_fails_alone(start_server, random_compact_checkpoint):
    server = start_server(HALO_CHECKPOINT=str(random_compact_checkpoint))
    files = distinct_images(9)
    files[4] = b"\x89PNG\r\n\x1a\n corrupt"
    responses = post_all(server.url, files)
    assert [r.status_code for r in responses] == [200] * 4 + [400] + [200] * 4
    assert post_all(server.url, distinct_images(1))[0].status_code == 200


def test_full_queue_is_503_with_retry_after_and_the_server_recovers(start_server):
    # An untrained halonet26t at 256 px: slow enough on CPU that a burst piles up.
    server = start_server(HALO_MODEL="halonet26t", HALO_MAX_QUEUE="2", HALO_MAX_BATCH_SIZE="1", HALO_WARMUP="false")
    photo = io.BytesIO()
    Image.new("RGB", (300, 300), (120, 80, 40)).save(photo, format="JPEG")
    responses = post_all(server.url, [photo.getvalue()] * 12, query="top_k=1")
    statuses = [r.status_code for r in responses]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["code"] == "overloaded"
    assert post_all(server.url, [photo.getvalue()], query="top_k=1")[0].status_code == 200


def test_requests_whose_deadline_passes_in_the_queue_are_504(start_server):
    """A model slow on this CPU, one image per forward, a short deadline: of 24 requests at once (their
    queue takes longer than the deadline even at 25 ms a forward, as on an AVX-512 EPYC, where 8 did
    not), those still queued at their deadline are dropped unseen."""
    server = start_server(HALO_MODEL="halonet26t", HALO_MAX_BATCH_SIZE="1", HALO_MODEL_WORKERS="1",
                          HALO_WARMUP="false", HALO_REQUEST_TIMEOUT_MS="400")
    photo = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 60, 90)).save(photo, format="PNG")
    responses = post_all(server.url, [photo.getvalue()] * 24, query="top_k=1")
    late = [r for r in responses if r.status_code == 504]
    assert late and all(r.json()["error"]["code"] == "deadline_exceeded" for r in late)
    assert {r.status_code for r in responses} <= {200, 504}
    assert server.metric('halo_images_dropped_total{reason="deadline"}') >= 1


def test_sigterm_during_a_burst_answers_every_accepted_request(start_server):
    server = start_server(HALO_MODEL="halonet26t", HALO_MAX_BATCH_SIZE="1", HALO_WARMUP="false")
    photo = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 60, 90)).save(photo, format="PNG")
    outcomes: List[object] = []

    def send() -> None:
        try:
            outcomes.append(httpx.post(f"{server.url}/predict", files=[("file", ("x.png", photo.getvalue()))],
                                       timeout=60).status_code)
        except httpx.TransportError as error:  # sent after the port closed: never accepted
            outcomes.append(type(error).__name__)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    until = time.monotonic() + 20
    while server.metric("halo_queue_depth") < 4:  # several accepted requests are waiting in the queue
        assert time.monotonic() < until, "the burst never queued up"
        time.sleep(0.005)
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    accepted = [o for o in outcomes if o == 200]
    # Sent after the signal: 503 during the grace period (HALO_SHUTDOWN_GRACE_S), refused after it.
    assert set(outcomes) <= {200, 503, "ConnectError"}, outcomes
    assert len(accepted) >= 5  # at least those queued at the signal, and the one computing
    assert server.process.wait(30) == 0  # a clean drain is a clean exit
