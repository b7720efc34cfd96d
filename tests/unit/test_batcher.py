"""The batching policy on its own, with a fake model: grouping, limits, deadlines, disconnects, drain."""
import asyncio
import threading
import time
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

from app.batcher import (Batcher, ClientGoneError, DeadlineExceededError, FixedWindow, Job, QueueFullError,
                         ShuttingDownError)
from app.metrics import Metrics


class FakeModel:
    """Returns each input's first value as its 'probabilities'; records batch sizes; can be held."""

    def __init__(self) -> None:
        self.batches: List[int] = []
        self.layers: List[List[Optional[str]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: Sequence[torch.Tensor], layers: Sequence[Optional[str]]
                 ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
        self.gate.wait(10)
        batch = torch.stack(list(images))
        self.batches.append(len(batch))
        self.layers.append(list(layers))
        return batch[:, 0], [row[:1] * 0 + 1 if layer else None for row, layer in zip(batch, layers)]


def make(model: FakeModel, max_batch_size: int = 4, max_wait_s: float = 0.05, max_queue: int = 100) -> Batcher:
    batcher = Batcher(model, FixedWindow(max_batch_size, max_wait_s), max_queue, Metrics())
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
        first, second = jobs(loop, [0]), jobs(loop, [1, 2])
        batcher.submit(first)  # taken by the model thread, which then blocks
        await asyncio.sleep(0.1)
        batcher.submit(second)
        with pytest.raises(QueueFullError):
            batcher.submit(jobs(loop, [3, 4]))  # 2 + 2 > 3: none of them is queued
        model.gate.set()
        return [(await job.future).probs.item() for job in first + second]

    assert asyncio.run(main()) == [0.0, 1.0, 2.0]
    batcher.close()
    assert batcher.drain(5) and len(model.batches) == 3  # the refused images never reached the model


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

    async def main():
        loop = asyncio.get_running_loop()
        with_maps, without = jobs(loop, [1], layer="layer.a"), jobs(loop, [2])
        batcher.submit(with_maps + without)
        return await with_maps[0].future, await without[0].future

    model = FakeModel()
    batcher = make(model)
    asked, not_asked = asyncio.run(main())
    assert asked.maps is not None and not_asked.maps is None
    assert model.layers == [["layer.a", None]]  # one forward, told which row wants which maps


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

    def flaky(images, layers):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return torch.stack(images)[:, 0], [None] * len(images)

    batcher = Batcher(flaky, FixedWindow(4, 0.0), 100, Metrics())
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


def test_images_on_their_way_are_waited_for_and_no_longer_once_queued_or_withdrawn() -> None:
    """The window is long (5 s); the model thread waits only while announced images are missing."""
    model = FakeModel()
    batcher = make(model, max_batch_size=8, max_wait_s=5.0)

    async def main():
        loop = asyncio.get_running_loop()
        batcher.expect(2)  # a request decoding two images
        batcher.expect(1)  # another, whose image will turn out undecodable
        first = jobs(loop, [0])
        started = time.monotonic()
        batcher.submit(first)
        await asyncio.sleep(0.2)
        second = jobs(loop, [1, 2])
        batcher.submit(second, announced=True)  # still one image announced: the thread waits on
        await asyncio.sleep(0.2)
        batcher.withdraw(1)  # nothing else is coming: the batch goes now, not after 5 s
        results = [await job.future for job in first + second]
        return results, time.monotonic() - started

    results, took = asyncio.run(main())
    assert model.batches == [3] and took < 2.0, (model.batches, took)
    assert [r.probs.item() for r in results] == [0.0, 1.0, 2.0]


def test_a_lone_request_is_not_held_for_company() -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=8, max_wait_s=5.0)

    async def main():
        loop = asyncio.get_running_loop()
        batcher.expect(1)
        lone = jobs(loop, [7])
        batcher.submit(lone, announced=True)
        return await lone[0].future

    assert asyncio.run(main()).queue_s < 0.05  # taken at once, not after the 5 s window


def test_several_workers_share_the_queued_images_out_evenly() -> None:
    """Eight images queued at once, two workers, batches of up to 8: one batch of all eight would leave
    the other worker idle and double the first's forward; each takes its share of four."""
    model = FakeModel()
    model.gate.clear()
    batcher = Batcher(model, FixedWindow(8, 0.0), 100, Metrics(), workers=2)

    async def main():
        request = jobs(asyncio.get_running_loop(), range(8))
        batcher.submit(request)
        batcher.start()
        await asyncio.sleep(0.2)
        model.gate.set()
        return [await job.future for job in request]

    results = asyncio.run(main())
    assert sorted(model.batches) == [4, 4] and [r.batch_size for r in results] == [4] * 8


class WakeRecordingWindow(FixedWindow):
    def __init__(self, max_batch_size: int, max_wait_s: float) -> None:
        super().__init__(max_batch_size, max_wait_s)
        self.wakes: List[float] = []

    def woke(self, late_s: float) -> None:
        self.wakes.append(late_s)


@pytest.mark.parametrize("window_s, second_after_s", [(5.0, 0.2), (0.1, None)], ids=["woken", "timed-out"])
def test_a_waiting_worker_reports_how_late_it_resumed(window_s: float, second_after_s: Optional[float]) -> None:
    """Lateness counts from the submit that woke the worker, or from the end of its wait: not from
    when it began waiting (0.2 s before that submit here)."""
    policy = WakeRecordingWindow(8, window_s)
    batcher = Batcher(FakeModel(), policy, 100, Metrics())
    batcher.start()

    async def main():
        loop = asyncio.get_running_loop()
        batcher.expect(2)
        first = jobs(loop, [0])
        batcher.submit(first)
        if second_after_s is not None:
            await asyncio.sleep(second_after_s)
            batcher.submit(jobs(loop, [1]), announced=True)
        else:
            await first[0].future  # the window ran out with one image still announced
            batcher.withdraw(1)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert policy.wakes and all(0 <= late < 0.1 for late in policy.wakes), policy.wakes
