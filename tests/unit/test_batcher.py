"""The batching policy on its own, with a fake model: grouping, limits, deadlines, disconnects, drain."""
import asyncio
import threading
import time
from typing import Dict, List, Set, Tuple

import pytest
import torch

from app.batcher import (Batcher, ClientGoneError, DeadlineExceededError, Job, QueueFullError,
                         ShuttingDownError)
from app.metrics import Metrics


class FakeModel:
    """Returns each input's first value as its 'probabilities'; records batch sizes; can be held."""

    def __init__(self) -> None:
        self.batches: List[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: torch.Tensor, layers: Set[str]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        self.gate.wait(10)
        self.batches.append(len(batch))
        maps = {layer: batch[:, :1] * 0 + 1 for layer in layers}
        return batch[:, 0], maps


def make(model: FakeModel, max_batch_size: int = 4, max_wait_s: float = 0.05, max_queue: int = 100) -> Batcher:
    batcher = Batcher(model, max_batch_size, max_wait_s, max_queue, Metrics())
    batcher.start()
    return batcher


def jobs(loop, values, deadline_s: float = 10.0, layer=None, gone=lambda: False) -> List[Job]:
    return [Job(torch.full((3,), float(v)), layer, time.monotonic() + deadline_s, loop, loop.create_future(),
                client_gone=gone) for v in values]


def test_concurrent_jobs_share_batches_and_get_their_own_results() -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=4)

    async def main():
        loop = asyncio.get_running_loop()
        requests = [jobs(loop, [i]) for i in range(10)]
        for request in requests:
            batcher.submit(request)
        return [await request[0].future for request in requests]

    results = asyncio.run(main())
    assert [r.probs.item() for r in results] == [float(i) for i in range(10)]
    assert sum(model.batches) == 10 and max(model.batches) == 4 and len(model.batches) < 10
    assert all(r.batch_size in model.batches for r in results)


def test_full_queue_refuses_the_whole_request() -> None:
    model = FakeModel()
    model.gate.clear()  # hold the model so the queue cannot drain
    batcher = make(model, max_batch_size=1, max_queue=3)

    async def main():
        loop = asyncio.get_running_loop()
        batcher.submit(jobs(loop, [0]))  # taken by the model thread, which then blocks
        await asyncio.sleep(0.1)
        batcher.submit(jobs(loop, [1, 2]))
        with pytest.raises(QueueFullError):
            batcher.submit(jobs(loop, [3, 4]))  # 2 + 2 > 3: none of them is queued
        assert batcher.depth == 2
        model.gate.set()

    asyncio.run(main())


def test_expired_and_abandoned_jobs_are_dropped_before_compute() -> None:
    model = FakeModel()
    model.gate.clear()
    batcher = make(model, max_batch_size=8)

    async def main():
        loop = asyncio.get_running_loop()
        blocker = jobs(loop, [0])
        batcher.submit(blocker)
        await asyncio.sleep(0.1)
        expired, gone, fine = jobs(loop, [1], deadline_s=0.01), jobs(loop, [2], gone=lambda: True), jobs(loop, [3])
        for request in (expired, gone, fine):
            batcher.submit(request)
        await asyncio.sleep(0.05)
        model.gate.set()
        with pytest.raises(DeadlineExceededError):
            await expired[0].future
        with pytest.raises(ClientGoneError):
            await gone[0].future
        assert (await fine[0].future).probs.item() == 3.0

    asyncio.run(main())
    assert model.batches == [1, 1]  # the blocker, then only the live job


def test_heatmap_maps_reach_only_the_jobs_that_asked() -> None:
    batcher = make(FakeModel())

    async def main():
        loop = asyncio.get_running_loop()
        with_maps, without = jobs(loop, [1], layer="layer.a"), jobs(loop, [2])
        batcher.submit(with_maps + without)
        return await with_maps[0].future, await without[0].future

    asked, not_asked = asyncio.run(main())
    assert asked.maps is not None and not_asked.maps is None


def test_close_refuses_new_work_and_drain_answers_the_accepted() -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=2)

    async def main():
        loop = asyncio.get_running_loop()
        accepted = jobs(loop, [1, 2, 3])
        batcher.submit(accepted)
        batcher.close()
        with pytest.raises(ShuttingDownError):
            batcher.submit(jobs(loop, [4]))
        drained = await loop.run_in_executor(None, batcher.drain, 10)
        return drained, [await job.future for job in accepted]

    drained, results = asyncio.run(main())
    assert drained and [r.probs.item() for r in results] == [1.0, 2.0, 3.0]


def test_a_failing_forward_fails_its_batch_and_the_thread_goes_on() -> None:
    calls = []

    def flaky(batch, layers):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return batch[:, 0], {}

    batcher = Batcher(flaky, 4, 0.0, 100, Metrics())
    batcher.start()

    async def main():
        loop = asyncio.get_running_loop()
        first = jobs(loop, [1])
        batcher.submit(first)
        with pytest.raises(RuntimeError, match="out of memory"):
            await first[0].future
        second = jobs(loop, [2])
        batcher.submit(second)
        return await second[0].future

    assert asyncio.run(main()).probs.item() == 2.0
