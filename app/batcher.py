"""Dynamic batching: images from concurrent requests share forward passes.

The policy, all of it here:

- A request's images enter one bounded queue (``max_queue`` images); a request that would
  overflow it is refused at once (``QueueFullError`` -> 503 with Retry-After).
- One model thread takes the oldest image, then keeps taking until the batch holds
  ``max_batch_size`` images or ``max_wait_s`` has passed since it took the first. Images already
  queued are taken without waiting, so under load batches fill instantly; and it waits only while
  more images are on their way (requests being decoded: announced with ``expect``, counted off
  when ``submit`` queues them or ``withdraw`` gives them up, either of which wakes it), so a lone
  request never waits for company that is not coming.
- Before compute, images whose request deadline has passed are answered with
  ``DeadlineExceededError`` (-> 504) and images whose client has gone are dropped.
- While the model thread computes, the event loop keeps accepting requests and the queue fills
  with the next batch. One forward serves the batch, heatmap maps only for the rows that asked;
  results go back to each request's own future: nothing is shared.
- ``close`` refuses new work; ``drain`` then waits until every accepted image is answered.
"""
import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .metrics import Metrics

# (batch (B, C, H, W), each row's heatmap layer or None) -> (probabilities (B, classes), each row's
# per-block maps, or None where its row asked for none).
Forward = Callable[[Tensor, Sequence[Optional[str]]], Tuple[Tensor, Sequence[Optional[Tensor]]]]


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
        self._queue: Deque[Job] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job queued, images withdrawn, or stop
        self._pending = 0  # accepted images not answered yet (queued or computing)
        self._closed = False
        self._stopping = False
        self._arriving = 0  # images announced by requests still decoding them
        self._thread = threading.Thread(target=self._run, name="halo-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def expect(self, images: int) -> None:
        """Announce images that a request is decoding: the model thread may wait for them."""
        with self._lock:
            self._arriving += images

    def withdraw(self, images: int) -> None:
        """Announced images that will not come (their request failed before submitting)."""
        with self._changed:
            self._arriving -= images
            self._changed.notify_all()

    def submit(self, jobs: List[Job], announced: bool = False) -> None:
        """Enqueue all of a request's images, or none of them. Images announced with ``expect`` are
        counted off in the same step (also when refused): the model thread never waits for images
        that are already queued."""
        with self._changed:
            self._changed.notify_all()  # taken up once the lock is free: queued, or no longer on their way
            if announced:
                self._arriving -= len(jobs)
            if self._closed:
                raise ShuttingDownError("the service is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFullError(f"the queue holds {len(self._queue)} images (limit {self.max_queue})")
            self._pending += len(jobs)
            self._queue.extend(jobs)
        self._metrics.queue_depth.set(len(self._queue))

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def drain(self, timeout: Optional[float] = None) -> bool:
        """After ``close``: wait until every accepted image is answered, then stop the model thread."""
        with self._changed:
            done = self._changed.wait_for(lambda: self._pending == 0, timeout)
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout)
        return done

    def _next_batch(self) -> Optional[List[Job]]:
        """Waits for a first job, then collects the batch by the policy above; None: stop."""
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._stopping)
            if not self._queue:
                return None
            batch, until = [self._queue.popleft()], time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = until - time.monotonic()
                if self._arriving <= 0 or self._stopping or remaining <= 0:
                    break  # nothing on its way, or waited long enough
                self._changed.wait(remaining)
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
            batch = self._next_batch()
            if batch is None:
                return
            self._metrics.queue_depth.set(len(self._queue))
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
            with self._changed:
                self._pending -= len(batch)
                self._changed.notify_all()

    def _compute(self, jobs: List[Job], started: float) -> None:
        try:
            probs, maps = self._forward(torch.stack([job.inputs for job in jobs]), [job.heatmap_layer for job in jobs])
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
            self._answer(job, JobResult(probs[i], maps[i], queue_s, inference_s, len(jobs)))
