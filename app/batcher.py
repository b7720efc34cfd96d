"""Dynamic batching: images from concurrent requests share forward passes.

The policy, all of it here:

- A request's images enter one bounded queue (``max_queue`` images); a request that would
  overflow it is refused at once (``QueueFullError`` -> 503 with Retry-After).
- One model thread takes the oldest image, then keeps taking until the batch holds
  ``max_batch_size`` images or ``max_wait_s`` has passed since it took the first. Images already
  queued are taken without waiting, so under load batches fill instantly; and it waits only while
  more images are on their way (requests being decoded, announced with ``arriving``), so a lone
  request never waits for company that is not coming.
- Before compute, images whose request deadline has passed are answered with
  ``DeadlineExceededError`` (-> 504) and images whose client has gone are dropped.
- While the model thread computes, the event loop keeps accepting requests and the queue fills
  with the next batch. Results go back to each request's own future: nothing is shared.
- ``close`` refuses new work; ``drain`` then waits until every accepted image is answered.
"""
import asyncio
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor

from .metrics import Metrics

Forward = Callable[[Tensor, Set[str]], Tuple[Tensor, Dict[str, Tensor]]]


class QueueFullError(Exception):
    """The queue cannot take the request's images now."""


class ShuttingDownError(Exception):
    """The service no longer accepts work."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its image was computed."""


class ClientGoneError(Exception):
    """The client disconnected before its image was computed."""


@dataclass
class Job:
    """One image of one request."""

    inputs: Tensor  # preprocessed (C, H, W)
    heatmap_layer: Optional[str]
    deadline: float  # time.monotonic() after which the image is not worth computing
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    client_gone: Callable[[], bool] = lambda: False
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class JobResult:
    probs: Tensor  # (classes,)
    maps: Optional[Tensor]  # (blocks, win, win) when a heatmap layer was asked for
    queue_s: float
    inference_s: float
    batch_size: int


class Batcher:
    def __init__(self, forward: Forward, max_batch_size: int, max_wait_s: float, max_queue: int, metrics: Metrics):
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # accepted images not answered yet (queued or computing)
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._arriving = 0  # images of requests still being decoded, about to be submitted
        self._thread = threading.Thread(target=self._run, name="halo-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @contextmanager
    def arriving(self, images: int) -> Iterator[None]:
        """Announce images that will be submitted soon (while their request decodes them)."""
        with self._lock:
            self._arriving += images
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= images

    def submit(self, jobs: List[Job]) -> None:
        """Enqueue all of a request's images, or none of them."""
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the service is shutting down")
            if self._queue.qsize() + len(jobs) > self.max_queue:
                raise QueueFullError(f"the queue holds {self._queue.qsize()} images (limit {self.max_queue})")
            self._pending += len(jobs)
            for job in jobs:
                self._queue.put(job)
        self._metrics.queue_depth.set(self._queue.qsize())

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def drain(self, timeout: Optional[float] = None) -> bool:
        """After ``close``: wait until every accepted image is answered, then stop the model thread."""
        with self._idle:
            done = self._idle.wait_for(lambda: self._pending == 0, timeout)
        self._queue.put(None)
        self._thread.join(timeout)
        return done

    def _collect(self, first: Job) -> List[Job]:
        batch, until = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if self._queue.empty() and self._arriving == 0:
                break  # nothing queued and nothing on its way: do not wait
            try:
                job = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop sentinel: finish this batch first
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _answer(self, job: Job, result: object) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # its event loop is closed: nobody is waiting for this answer any more
            pass

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            self._metrics.queue_depth.set(self._queue.qsize())
            now = time.monotonic()
            live = []
            for job in batch:
                if now > job.deadline:
                    self._metrics.dropped.labels("deadline").inc()
                    self._answer(job, DeadlineExceededError("the request's deadline passed while it was queued"))
                elif job.client_gone() or job.future.cancelled():
                    self._metrics.dropped.labels("client_gone").inc()
                    self._answer(job, ClientGoneError("the client disconnected"))
                else:
                    live.append(job)
            if live:
                self._compute(live, now)
            with self._idle:
                self._pending -= len(batch)
                self._idle.notify_all()

    def _compute(self, jobs: List[Job], started: float) -> None:
        layers = {job.heatmap_layer for job in jobs if job.heatmap_layer}
        try:
            probs, maps = self._forward(torch.stack([job.inputs for job in jobs]), layers)
        except Exception as error:  # a failing forward fails its batch, never the process
            for job in jobs:
                self._answer(job, error)
            return
        inference_s = time.monotonic() - started
        self._metrics.batch_size.observe(len(jobs))
        self._metrics.inference.observe(inference_s)
        self._metrics.images.inc(len(jobs))
        for i, job in enumerate(jobs):
            queue_s = started - job.enqueued
            self._metrics.queue_wait.observe(queue_s)
            job_maps = maps[job.heatmap_layer][i] if job.heatmap_layer else None
            self._answer(job, JobResult(probs[i], job_maps, queue_s, inference_s, len(jobs)))
