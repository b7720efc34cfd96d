"""The request pipeline with a fake model: answers in order and to their own request, one forward for
concurrent requests, no wait for images that will not come, heatmaps only where asked."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import pytest
import torch

from app.batcher import AdaptiveWindow, Batcher, FixedWindow, ForwardCosts, Job
from app.config import Settings
from app.engine import Engine
from app.errors import ServiceError
from app.metrics import Metrics
from app.pipeline import INLINE_DECODE_BYTES, Pipeline
from app.schemas import PredictOptions
from model.decoding import ImageDecodeError
from model.geometry import InputGeometry
from model.heatmaps import SourceImage

LAYER = "stages.2.attn"


class FakeEngine:
    """An "image" is bytes whose first byte is its class (of 6); b"bad" does not decode."""

    name, version = "fake", "0"
    labels = ["zero", "one", "two", "three", "four", "five"]
    halo_layers = {LAYER: None}
    default_heatmap_layer = LAYER
    top_k = Engine.top_k

    def __init__(self) -> None:
        self.forwards: List[List[Optional[str]]] = []

    def declared_pixels(self, data: bytes) -> int:
        return 1

    def decode(self, data: bytes) -> torch.Tensor:
        if data == b"bad":
            raise ImageDecodeError("cannot identify image file")
        return torch.tensor([float(data[0]), 0.0])

    def decode_with_source(self, data: bytes, picture_side: Optional[int] = None):
        return self.decode(data), SourceImage(InputGeometry((1, 1), (0, 0, 1, 1), (0, 0, 1, 1)))

    def forward(self, images: Sequence[torch.Tensor], layers: Sequence[Optional[str]]):
        self.forwards.append(list(layers))
        batch = torch.stack(list(images))
        probs = torch.nn.functional.one_hot(batch[:, 0].long(), len(self.labels)).float()
        return probs, [torch.ones(1, 2, 2) / 4 if layer else None for layer in layers]

    def heatmaps(self, source: SourceImage, maps: torch.Tensor, layer: str, fmt: str) -> dict:
        return dict(layer=layer, total=float(maps.sum()))


@pytest.fixture(params=["fixed", "adaptive"])
def pipeline(request):
    """A pipeline on the fake engine with a long batch window (5 s): waiting shows as seconds. The
    adaptive policy's costs say that batching is nearly free: it would wait wherever waiting can pay."""
    settings = Settings(max_batch_size=8, max_wait_ms=5000, max_images_per_request=4)
    engine = FakeEngine()
    policy = FixedWindow(settings.max_batch_size, 5.0) if request.param == "fixed" else AdaptiveWindow(
        settings.max_batch_size, 5.0, ForwardCosts({n: 0.01 + 0.0001 * n for n in (1, 2, 4, 8)}))
    metrics = Metrics()
    batcher = Batcher(engine.forward, policy, settings.max_queue, metrics)
    batcher.start()
    pool = ThreadPoolExecutor(2)
    yield Pipeline(engine, batcher, pool, settings, metrics)
    batcher.close()
    batcher.drain(5)
    pool.shutdown()


def queued(pipeline: Pipeline) -> float:
    """Images waiting for the model, as /metrics shows them."""
    return pipeline.metrics.registry.get_sample_value("halo_queue_depth")


def predict(pipeline: Pipeline, files: List[bytes], **options) -> List[dict]:
    return pipeline.predict(files, PredictOptions(**options), time.monotonic() + 30)


def labels(results: List[dict]) -> List[str]:
    return [r["predictions"][0]["label"] for r in results]


def test_concurrent_requests_share_one_forward_and_get_their_own_answers(pipeline) -> None:
    async def main():
        return await asyncio.gather(predict(pipeline, [b"\x01", b"\x02"]), predict(pipeline, [b"\x03"]),
                                    predict(pipeline, [b"\x00", b"\x01", b"\x03"]))

    started = time.monotonic()
    first, second, third = asyncio.run(main())
    assert labels(first) == ["one", "two"] and labels(second) == ["three"]
    assert labels(third) == ["zero", "one", "three"]
    assert pipeline.engine.forwards == [[None] * 6]
    assert time.monotonic() - started < 2  # nothing was left to wait for once all six were queued


def test_a_lone_request_is_answered_without_waiting_for_company(pipeline) -> None:
    results = asyncio.run(predict(pipeline, [b"\x02"]))
    assert labels(results) == ["two"] and results[0]["timing"]["queue_ms"] < 50


def test_one_client_in_a_loop_waits_under_a_millisecond_in_the_queue(pipeline) -> None:
    async def client():
        return [(await predict(pipeline, [b"\x01"]))[0]["timing"]["queue_ms"] for _ in range(30)]

    waits = sorted(asyncio.run(client()))
    assert waits[len(waits) // 2] < 1 and waits[-1] < 50  # the worst allows for a busy machine


def test_an_undecodable_image_fails_its_request_alone_and_no_batch_waits_for_it(pipeline) -> None:
    async def main():
        return await asyncio.gather(predict(pipeline, [b"\x01"]), predict(pipeline, [b"\x02", b"bad"]),
                                    return_exceptions=True)

    started = time.monotonic()
    good, bad = asyncio.run(main())
    assert labels(good) == ["one"]
    assert isinstance(bad, ServiceError) and (bad.status, bad.code) == (400, "undecodable_image")
    assert "image 1" in bad.message
    assert time.monotonic() - started < 2  # the failed request's announced images were withdrawn


def test_heatmaps_are_computed_in_the_same_forward_for_the_rows_that_asked(pipeline) -> None:
    async def main():
        return await asyncio.gather(predict(pipeline, [b"\x01"], heatmaps=True), predict(pipeline, [b"\x02"]))

    with_maps, without = asyncio.run(main())
    assert with_maps[0]["heatmaps"] == {"layer": LAYER, "total": 1.0} and "heatmaps" not in without[0]
    assert pipeline.engine.forwards == [[LAYER, None]]


@pytest.mark.parametrize("files, options, status, code", [
    ([b"\x01"] * 5, {}, 413, "too_many_images"),
    ([b"\x01"], {"top_k": 7}, 422, "invalid_options"),
    ([b"\x01"], {"heatmaps": True, "heatmap_layer": "head.fc"}, 422, "invalid_options"),
])
def test_requests_the_model_cannot_answer_are_refused_before_decoding(pipeline, files, options, status, code) -> None:
    with pytest.raises(ServiceError) as refused:
        asyncio.run(predict(pipeline, files, **options))
    assert (refused.value.status, refused.value.code) == (status, code)
    assert queued(pipeline) == 0 and pipeline.engine.forwards == []


def test_a_failing_heatmap_fails_its_own_request_only(pipeline, monkeypatch) -> None:
    def heatmaps(source: SourceImage, maps: torch.Tensor, layer: str, fmt: str) -> dict:
        raise RuntimeError("poisoned heatmap")

    monkeypatch.setattr(pipeline.engine, "heatmaps", heatmaps)

    async def main():
        return await asyncio.gather(predict(pipeline, [b"\x01"], heatmaps=True), predict(pipeline, [b"\x02"]),
                                    return_exceptions=True)

    poisoned, fine = asyncio.run(main())
    assert isinstance(poisoned, RuntimeError) and labels(fine) == ["two"]
    assert sorted(pipeline.engine.forwards[0], key=str) == [None, LAYER]  # both were in the same batch


class CountingEngine(FakeEngine):
    """Says an image has as many pixels as bytes; counts what it decodes, slowly when asked."""

    def __init__(self, decode_s: float = 0.0) -> None:
        super().__init__()
        self.decoded, self.decode_s = 0, decode_s

    def declared_pixels(self, data: bytes) -> int:
        return len(data)

    def decode(self, data: bytes) -> torch.Tensor:
        self.decoded += 1
        time.sleep(self.decode_s)
        return super().decode(data)


def idle_pipeline(engine: FakeEngine, **settings) -> Pipeline:
    """A pipeline whose model workers never start: what is submitted stays queued. It decodes in its
    threads, whatever the size, unless told otherwise (``inline_decode_pixels``)."""
    settings = Settings(max_batch_size=4, max_images_per_request=4, **{"inline_decode_pixels": 0, **settings})
    policy = FixedWindow(4, 0.0, ForwardCosts({1: 0.1, 4: 0.2}))
    metrics = Metrics()
    return Pipeline(engine, Batcher(engine.forward, policy, 512, metrics), ThreadPoolExecutor(2), settings, metrics)


def test_a_request_that_would_wait_too_long_is_refused_before_it_is_decoded() -> None:
    """Four images take 0.2 s per forward: with a 1 s bound, 20 images ahead are what fits."""
    engine = CountingEngine()
    pipeline = idle_pipeline(engine, max_queue_wait_ms=1000)

    async def main():
        for _ in range(5):
            pipeline.batcher.submit([Job(torch.zeros(2), None, time.monotonic() + 60, asyncio.get_running_loop(),
                                         asyncio.get_running_loop().create_future()) for _ in range(4)])
        with pytest.raises(ServiceError) as refused:
            await predict(pipeline, [b"\x01"])
        return refused.value

    refused = asyncio.run(main())
    assert (refused.status, refused.code, refused.retry_after) == (503, "overloaded", 1)
    assert "HALO_MAX_QUEUE_WAIT_MS=1000" in refused.message and engine.decoded == 0
    assert pipeline.batcher.expected_wait_s(0) == pytest.approx(1.0)


def test_pixels_are_counted_from_headers_before_decoding() -> None:
    engine = CountingEngine(decode_s=0.3)
    pipeline = idle_pipeline(engine, max_request_pixels=100, max_decoding_pixels=150)

    async def main():
        with pytest.raises(ServiceError) as too_large:
            await predict(pipeline, [b"\x01" * 60, b"\x01" * 60])
        slow = asyncio.create_task(predict(pipeline, [b"\x01" * 90]))
        await asyncio.sleep(0.1)  # decoding: 90 of the 150 pixels in use
        with pytest.raises(ServiceError) as over_budget:
            await predict(pipeline, [b"\x01" * 61])
        slow.cancel()
        return too_large.value, over_budget.value

    too_large, over_budget = asyncio.run(main())
    pipeline.preprocess_pool.shutdown(wait=True)  # the cancelled request's decoding ends on its own
    assert (too_large.status, too_large.code) == (413, "request_too_large")
    assert (over_budget.status, over_budget.code) == (503, "overloaded")
    assert "HALO_MAX_DECODING_PIXELS=150" in over_budget.message
    assert engine.decoded == 1 and pipeline.decoding.in_use == 0


def test_a_deadline_that_passes_while_decoding_is_504_and_says_so() -> None:
    pipeline = idle_pipeline(CountingEngine(decode_s=0.2))
    with pytest.raises(ServiceError) as late:
        asyncio.run(pipeline.predict([b"\x01"], PredictOptions(), time.monotonic() + 0.1))
    assert (late.value.status, late.value.code) == (504, "deadline_exceeded")
    assert "while its images were decoded" in late.value.message
    assert queued(pipeline) == 0


def test_small_requests_are_decoded_on_the_event_loop_and_larger_ones_in_the_threads() -> None:
    class ThreadNamingEngine(CountingEngine):
        """A file of a b"\x02" byte and any other bytes holds one pixel."""

        def declared_pixels(self, data: bytes) -> int:
            self.header_threads.append(threading.current_thread().name)
            return 1 if data[:1] == b"\x02" else len(data)

        def decode(self, data: bytes) -> torch.Tensor:
            self.threads.append(threading.current_thread().name)
            return super().decode(data)

    engine = ThreadNamingEngine()
    engine.threads, engine.header_threads = [], []
    pipeline = idle_pipeline(engine, inline_decode_pixels=100)
    few_pixels_many_bytes = b"\x02" + bytes(INLINE_DECODE_BYTES)  # as a GIF of extension blocks

    async def main():
        # 100 pixels, then 101; then 1 pixel in more bytes than the event loop reads
        for files in ([b"\x01" * 60, b"\x01" * 40], [b"\x01" * 60, b"\x01" * 41], [few_pixels_many_bytes]):
            task = asyncio.create_task(predict(pipeline, files))
            await asyncio.sleep(0.2)  # decoded and queued: the model workers never start
            task.cancel()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    pipeline.preprocess_pool.shutdown(wait=True)
    assert engine.threads[:2] == [loop_thread] * 2
    assert len(engine.threads) == 5 and loop_thread not in engine.threads[2:]
    assert engine.header_threads[:4] == [loop_thread] * 4 and engine.header_threads[4] != loop_thread
    assert queued(pipeline) == 5
