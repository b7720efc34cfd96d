"""Dynamic batching: images from concurrent requests share forward passes.

The policy, all of it here:

- A request's images enter one bounded queue (``max_queue`` images); a request that would
  overflow it is refused at once (``QueueFullError`` -> 503 with Retry-After). Before that,
  ``expected_wait_s`` tells the pipeline how long a request's images would wait (the images ahead
  of them over the measured forward costs), so that it refuses what would wait too long before
  reading or decoding anything.
- Each model worker (one thread; several when the model dominates, each with its own batch) takes
  the oldest image, then keeps taking: images already queued without waiting, so under load
  batches fill instantly, up to the policy's batch size (with several workers, up to a fair share
  of the images accepted and not answered, so that none takes what the next free one would). It
  waits only while more images are on their way (requests being decoded: announced with
  ``expect``, counted off when ``submit`` queues them or ``withdraw`` gives them up, either of
  which wakes it), so a lone request never waits for company that is not coming; how long it
  waits is the policy's:
  - ``FixedWindow``: up to ``max_wait_s`` after the first image, batches up to ``max_batch_size``.
  - ``AdaptiveWindow`` (the default): from ``ForwardCosts`` (seconds per forward by batch size,
    seeded by the warm-up, learned as it serves), the measured gap between arriving images and how
    late a waiting worker resumes (each wait's lateness, which the worker reports), it waits for
    the images on their way only while that lowers the expected latency of those in hand and
    those coming (never past ``max_wait_s``), and forms no batch larger than the size where
    images/s stops growing.
- Before compute, images whose request deadline has passed are answered with
  ``DeadlineExceededError`` (-> 504) and images whose client has gone are dropped.
- While a worker computes, the event loop keeps accepting requests and the queue fills with the
  next batch. One forward serves the batch, heatmap maps only for the rows that asked; results go
  back to each request's own future: nothing is shared.
- ``close`` refuses new work; ``drain`` then waits until every accepted image is answered.
"""
import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from torch import Tensor

from .metrics import Metrics

# (the batch's B images, (C, H, W) each, each row's heatmap layer or None) -> (probabilities (B, classes),
# each row's per-block maps, or None where its row asked for none). The images come as a list: the
# forward stacks them where its device wants them (on CUDA, straight into pinned memory).
Forward = Callable[[Sequence[Tensor], Sequence[Optional[str]]], Tuple[Tensor, Sequence[Optional[Tensor]]]]


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


class ForwardCosts:
    """Seconds of one forward by batch size: per size, an exponential moving average of what the
    forwards took (the warm-up seeds it, serving updates it); sizes not measured yet are read off
    the line between the nearest measured ones, or scaled from the largest."""

    SMOOTHING = 0.2  # weight of the newest forward: a few dozen batches of a size follow a change

    def __init__(self, seed: Mapping[int, float] = ()) -> None:
        self._seconds: Dict[int, float] = {}
        for size, seconds in dict(seed).items():
            self.observe(size, seconds)

    @property
    def known(self) -> bool:
        return bool(self._seconds)

    def observe(self, size: int, seconds: float) -> None:
        before = self._seconds.get(size)
        self._seconds[size] = seconds if before is None else before + self.SMOOTHING * (seconds - before)

    def seconds(self, size: int) -> float:
        if size in self._seconds:
            return self._seconds[size]
        sizes = sorted(self._seconds)
        below = [s for s in sizes if s < size]
        above = [s for s in sizes if s > size]
        if not below:
            return self._seconds[above[0]]
        if not above:
            return self._seconds[below[-1]] * size / below[-1]
        lo, hi = below[-1], above[0]
        return self._seconds[lo] + (self._seconds[hi] - self._seconds[lo]) * (size - lo) / (hi - lo)

    def efficient_size(self, limit: int, tolerance: float = 0.03) -> int:
        """The smallest measured size up to ``limit`` whose images/s is within ``tolerance`` of the
        best measured: beyond it a larger batch adds latency and no throughput."""
        sizes = sorted(s for s in self._seconds if s <= limit)
        if not sizes:
            return limit
        rates = {s: s / max(self._seconds[s], 1e-9) for s in sizes}
        best = max(rates.values())
        return next(s for s in sizes if rates[s] >= (1 - tolerance) * best)


class BatchPolicy(Protocol):
    """How large a batch may grow and how long a worker waits for it; told what arrives and what
    forwards cost (``costs``, which admission reads too)."""

    costs: ForwardCosts

    def batch_size(self) -> int: ...

    def wait_s(self, batch: int, arriving: int, waited_s: float) -> float:
        """How long to wait now for the next image, with ``batch`` images taken, ``arriving`` on
        their way and ``waited_s`` since the first was taken (0: compute the batch as it is)."""
        ...

    def arrived(self, images: int, now: float, still_arriving: int) -> None:
        """``images`` were queued at ``now``, with ``still_arriving`` more announced."""
        ...

    def computed(self, batch: int, seconds: float) -> None: ...

    def woke(self, late_s: float) -> None:
        """A worker that waited resumed ``late_s`` after the image it waited for was queued (or its
        wait ran out): what a wait costs beyond the wait itself."""
        ...


MIN_WAIT_S = 1e-4  # a shorter wait costs about as much in the wake-up as it could gain


class FixedWindow:
    """Batches up to ``max_batch_size``, waiting up to ``max_wait_s`` after the first image for
    images on their way (HALO_BATCH_POLICY=fixed). Keeps the forwards' costs all the same: the
    admission of requests reads them."""

    def __init__(self, max_batch_size: int, max_wait_s: float, costs: Optional[ForwardCosts] = None):
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.costs = costs if costs is not None else ForwardCosts()

    def batch_size(self) -> int:
        return self.max_batch_size

    def wait_s(self, batch: int, arriving: int, waited_s: float) -> float:
        remaining = self.max_wait_s - waited_s
        return remaining if arriving > 0 and remaining >= MIN_WAIT_S else 0.0

    def arrived(self, images: int, now: float, still_arriving: int) -> None:
        pass

    def computed(self, batch: int, seconds: float) -> None:
        self.costs.observe(batch, seconds)

    def woke(self, late_s: float) -> None:
        pass


class AdaptiveWindow(FixedWindow):
    """Waits for the images on their way only when that lowers the expected total latency of the
    images in the batch and of those coming (HALO_BATCH_POLICY=adaptive), from the forward costs
    ``c(k)`` and the mean gap ``g`` between arriving images. With ``n`` images in hand and ``m`` on
    their way (as many as the batch and the window can still take), the ``i``-th arriving after
    ``i g``:

    - compute now: the ``n`` images take ``c(n)``; the ``m`` run together once the model is free
      and the last of them is in: ``n c(n) + m (max(c(n), m g) + c(m)) - g m (m + 1) / 2``;
    - wait for them: all ``n + m`` run together once the last is in and the worker is awake:
      ``(n + m)(m g + w + c(n + m)) - g m (m + 1) / 2``, where ``w`` is how late a waiting worker
      resumes (measured: the thread takes Python's lock back from the event loop, which holds it
      while it parses and decodes requests: 0.3 ms median, 1.2 ms at p90 at 8 clients on 2 cores).

    Counting every image on its way, not the next one alone (under a stream the next image does not
    run on its own but with those that arrive during the forward), and the wake-up: without them
    the rule waited where taking what was queued served more (the shipped model on 2 cores,
    docs/performance.md).

    ``g`` is averaged over the gaps that follow an arrival with more images announced: the gaps
    between bursts (when nothing was on its way) do not count.

    Waiting pays where the images coming add less to a forward than a forward of their own costs,
    and arrive soon. Never past ``max_wait_s``, and batches stop at the size where images/s stops
    growing (``ForwardCosts.efficient_size``), at most ``max_batch_size``, except one batch in
    ``EXPLORE_EVERY`` of those that reached that size, which may grow to twice it: the costs of
    sizes above it are otherwise never measured again, and a warm-up that timed them slow (beside
    another replica's warm-up on the same cores: batches capped at 4 where 12-18 served more) would
    hold the batches small for good. Until costs are known it behaves as the fixed window."""

    GAP_SMOOTHING = 0.1  # gaps between requests vary a lot: average over a few dozen
    WAKE_SMOOTHING = 0.1  # so do wake-ups
    EXPLORE_EVERY = 20  # batches at the size limit before one may be twice as large

    def __init__(self, max_batch_size: int, max_wait_s: float, costs: ForwardCosts):
        super().__init__(max_batch_size, max_wait_s, costs)
        self._size = costs.efficient_size(max_batch_size) if costs.known else max_batch_size
        self._gap: Optional[float] = None  # seconds between images, moving average
        self._last_arrival: Optional[float] = None
        self._wake = 0.0  # seconds a waiting worker resumes late, moving average
        self._at_limit = 0  # batches that reached self._size since the last larger one

    def batch_size(self) -> int:
        if self._at_limit >= self.EXPLORE_EVERY:
            return min(2 * self._size, self.max_batch_size)
        return self._size

    def wait_s(self, batch: int, arriving: int, waited_s: float) -> float:
        if not self.costs.known or self._gap is None:
            return super().wait_s(batch, arriving, waited_s)
        remaining = self.max_wait_s - waited_s
        if remaining < MIN_WAIT_S:
            return 0.0
        c, g, n = self.costs.seconds, self._gap, batch
        m = min(arriving, self.batch_size() - n, int(remaining / g) if g > 0 else arriving)  # what can still join
        if m <= 0:
            return 0.0
        compute_now = n * c(n) + m * (max(c(n), m * g) + c(m))
        wait = (n + m) * (m * g + self._wake + c(n + m))  # both less the arrivals' own g m (m + 1) / 2
        return min(remaining, max(g, MIN_WAIT_S)) if wait < compute_now else 0.0

    def arrived(self, images: int, now: float, still_arriving: int) -> None:
        # The gap is measured from an arrival after which more images were announced: the waits it
        # prices are those with images on their way, not the pauses between bursts.
        if self._last_arrival is not None and images > 0:
            gap = (now - self._last_arrival) / images
            self._gap = gap if self._gap is None else self._gap + self.GAP_SMOOTHING * (gap - self._gap)
        self._last_arrival = now if still_arriving > 0 else None

    def computed(self, batch: int, seconds: float) -> None:
        super().computed(batch, seconds)
        self._at_limit = 0 if batch > self._size else self._at_limit + (batch == self._size)
        self._size = self.costs.efficient_size(self.max_batch_size)

    def woke(self, late_s: float) -> None:
        self._wake += self.WAKE_SMOOTHING * (late_s - self._wake)


@dataclass
class JobResult:
    probs: Tensor  # (classes,)
    maps: Optional[Tensor]  # (blocks, win, win) when a heatmap layer was asked for
    queue_s: float
    inference_s: float
    batch_size: int


class Batcher:
    def __init__(self, forward: Forward, policy: BatchPolicy, max_queue: int, metrics: Metrics, workers: int = 1):
        self._forward = forward
        self.policy = policy
        self.max_queue = max_queue
        self.workers = workers
        self._metrics = metrics
        self._queue: Deque[Job] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job queued, images withdrawn, or stop
        self._pending = 0  # accepted images not answered yet (queued or computing)
        self._closed = False
        self._stopping = False
        self._arriving = 0  # images announced by requests still decoding them
        self._first_queued: Optional[float] = None  # the first submit since a worker began waiting: what wakes it
        self._threads = [threading.Thread(target=self._run, name=f"halo-model-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def expected_wait_s(self, images: int) -> float:
        """How long ``images`` more would take to be answered, from the images ahead of them
        (queued, computing, being decoded) and the measured forward costs, the model workers
        sharing them out in batches of the policy's size; 0 while no cost is known."""
        with self._lock:
            ahead = self._pending + self._arriving + images
            size = self.policy.batch_size()
            costs = self.policy.costs
            if not costs.known:
                return 0.0
            per_worker = math.ceil(ahead / self.workers)
            batch = min(size, per_worker)
            return math.ceil(per_worker / batch) * costs.seconds(batch)

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
            now = time.monotonic()
            self._first_queued = self._first_queued or now
            self.policy.arrived(len(jobs), now, self._arriving)
        self._metrics.queue_depth.set(len(self._queue))

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def drain(self, timeout: Optional[float] = None) -> bool:
        """After ``close``: wait until every accepted image is answered, then stop the model workers."""
        with self._changed:
            done = self._changed.wait_for(lambda: self._pending == 0, timeout)
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        return done

    def _next_batch(self) -> Optional[List[Job]]:
        """Waits for a first job, then collects the batch by the policy above; None: stop."""
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._stopping)
            if not self._queue:
                return None
            batch, started = [self._queue.popleft()], time.monotonic()
            while len(batch) < self._batch_limit():
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                wait = 0.0 if self._stopping else self.policy.wait_s(len(batch), self._arriving,
                                                                     time.monotonic() - started)
                if wait <= 0:
                    break  # nothing on its way, or not worth waiting for
                waiting_since, self._first_queued = time.monotonic(), None
                self._changed.wait(wait)
                due = min(self._first_queued or math.inf, waiting_since + wait)  # notified, or the wait ran out
                self.policy.woke(max(0.0, time.monotonic() - due))
            return batch

    def _batch_limit(self) -> int:
        """The policy's batch size; with several model workers, at most a fair share of the images
        accepted and not answered (queued, or in the others' forwards): a worker that took all that
        was queued left the next free one nothing, and its own forward, twice as long, set p99
        (halonet26t, two workers, 8 clients: p99 x0.88 with the share, docs/performance.md)."""
        if self.workers == 1:
            return self.policy.batch_size()
        return min(self.policy.batch_size(), max(1, math.ceil(self._pending / self.workers)))

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
            probs, maps = self._forward([job.inputs for job in jobs], [job.heatmap_layer for job in jobs])
        except Exception as error:  # a failing forward fails its batch, never the process
            for job in jobs:
                self._answer(job, error)
            return
        inference_s = time.monotonic() - started
        with self._lock:
            self.policy.computed(len(jobs), inference_s)
        self._metrics.batch_size.observe(len(jobs))
        self._metrics.inference.observe(inference_s)
        self._metrics.images.inc(len(jobs))
        for i, job in enumerate(jobs):
            queue_s = started - job.enqueued
            self._metrics.queue_wait.observe(queue_s)
            self._answer(job, JobResult(probs[i], maps[i], queue_s, inference_s, len(jobs)))
