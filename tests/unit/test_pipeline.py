"""The request pipeline with a fake model: answers in order and to their own request, one forward for
concurrent requests, no wait for images that will not come, heatmaps only where asked."""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import pytest
import torch

from app.batcher import AdaptiveWindow, Batcher, FixedWindow, ForwardCosts
from app.config import Settings
from app.engine import Engine
from app.errors import ServiceError
from app.metrics import Metrics
from app.pipeline import Pipeline
from app.schemas import PredictOptions
from model.decoding import ImageDecodeError

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

    def decode(self, data: bytes) -> torch.Tensor:
        if data == b"bad":
            raise ImageDecodeError("cannot identify image file")
        return torch.tensor([float(data[0]), 0.0])

    def forward(self, batch: torch.Tensor, layers: Sequence[Optional[str]]):
        self.forwards.append(list(layers))
        probs = torch.nn.functional.one_hot(batch[:, 0].long(), len(self.labels)).float()
        return probs, [torch.ones(1, 2, 2) / 4 if layer else None for layer in layers]

    def heatmaps(self, inputs: torch.Tensor, maps: torch.Tensor, layer: str, fmt: str) -> dict:
        return dict(layer=layer, total=float(maps.sum()))


@pytest.fixture(params=["fixed", "adaptive"])
def pipeline(request):
    """A pipeline on the fake engine with a long batch window (5 s): waiting shows as seconds. The
    adaptive policy's costs say that batching is nearly free: it would wait wherever waiting can pay."""
    settings = Settings(max_batch_size=8, max_wait_ms=5000, max_images_per_request=4)
    engine = FakeEngine()
    policy = FixedWindow(settings.max_batch_size, 5.0) if request.param == "fixed" else AdaptiveWindow(
        settings.max_batch_size, 5.0, ForwardCosts({n: 0.01 + 0.0001 * n for n in (1, 2, 4, 8)}))
    batcher = Batcher(engine.forward, policy, settings.max_queue, Metrics())
    batcher.start()
    pool = ThreadPoolExecutor(2)
    yield Pipeline(engine, batcher, pool, settings)
    batcher.close()
    batcher.drain(5)
    pool.shutdown()


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
    assert pipeline.batcher.depth == 0 and pipeline.engine.forwards == []
