"""A request's whole journey, from image bytes to answers, with no HTTP: check the options, admit
it (its expected wait, then its images' pixels from their headers), decode and preprocess (small
images on the event loop, larger ones in the thread pool), submit all of its images or none, await
them, then top-k and heatmap payloads. Every protocol the service speaks calls ``Pipeline.classify``
(``predict`` for /predict's answers on top of it), so the limits, batching and metrics are the same
for all; failures are ``ServiceError`` (status, code, message), which each protocol's adapter turns
into its own error form."""
import asyncio
import math
import threading
import time
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple, Union

from torch import Tensor

from model.decoding import ImageDecodeError, ImageTooLargeError, UnsupportedImageFormatError
from model.heatmaps import SourceImage

from .batcher import Batcher, ClientGoneError, DeadlineExceededError, Job, JobResult, QueueFullError, ShuttingDownError
from .config import Settings
from .engine import Engine
from .errors import ServiceError
from .heap import release_free_memory
from .metrics import Metrics
from .schemas import PredictOptions

# After decoding more pixels than this in one request, free heap memory goes back to the system: a
# few large images left the process 2 GB big after they were done.
LARGE_DECODE_PIXELS = 4_000_000


# The most bytes of files decoded on the event loop (with few pixels, HALO_INLINE_DECODE_PIXELS): a file
# that is mostly not pixels (GIF extension blocks, which Pillow parses at about 0.2 us a byte) holds the
# loop for at most about 13 ms. A 256 x 256 JPEG photo is 20-60 kB.
INLINE_DECODE_BYTES = 65536


class DecodingBudget:
    """Pixels being decoded at once, all requests together (HALO_MAX_DECODING_PIXELS): a request
    whose images would go over it is refused, before it decodes anything, rather than queued behind
    others' huge images; small requests almost always fit in what is left."""

    def __init__(self, limit: int):
        self.limit, self.in_use = limit, 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.in_use and self.in_use + pixels > self.limit:
                raise ServiceError(503, "overloaded", f"{self.in_use} pixels are being decoded; {pixels} more would "
                                   f"go over HALO_MAX_DECODING_PIXELS={self.limit}", retry_after=1)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels


class Pipeline:
    def __init__(self, engine: Engine, batcher: Batcher, preprocess_pool: Executor, settings: Settings,
                 metrics: Metrics):
        self.engine, self.batcher, self.preprocess_pool, self.settings = engine, batcher, preprocess_pool, settings
        self.metrics = metrics
        self.decoding = DecodingBudget(settings.max_decoding_pixels)

    def admit(self, images: int) -> None:
        """Refuses (503, Retry-After) a request whose ``images`` would wait longer than
        HALO_MAX_QUEUE_WAIT_MS for the model: under overload the queue then holds no more than the
        model answers in that time, and a refusal costs microseconds, not a body read and a decode."""
        wait_s, bound_s = self.batcher.expected_wait_s(images), self.settings.max_queue_wait_ms / 1000
        if wait_s > bound_s:
            raise ServiceError(503, "overloaded", f"the images ahead would take {wait_s:.2f} s to answer, over "
                               f"HALO_MAX_QUEUE_WAIT_MS={self.settings.max_queue_wait_ms:g}",
                               retry_after=max(1, math.ceil(wait_s - bound_s)))

    def check_count(self, images: int) -> None:
        if images > self.settings.max_images_per_request:
            raise self.too_many_images(str(images))

    def too_many_images(self, count: str) -> ServiceError:
        """The 413 of a request with more images than HALO_MAX_IMAGES_PER_REQUEST; ``count``: how many it
        has, as far as it was read."""
        return ServiceError(413, "too_many_images",
                            f"{count} images in one request; the limit is {self.settings.max_images_per_request}")

    def check_top_k(self, k: int) -> None:
        if k > len(self.engine.labels):
            raise ServiceError(422, "invalid_options",
                               f"top_k must be at most {len(self.engine.labels)} (the class count)")

    def heatmap_layer(self, name: Optional[str]) -> str:
        """The halo layer to take heatmaps from: ``name``, or the model's default when None."""
        layer = name or self.engine.default_heatmap_layer
        if layer not in self.engine.halo_layers:
            raise ServiceError(422, "invalid_options", f"heatmap_layer {layer!r} is not a halo attention layer; "
                                                       f"choose one of {', '.join(self.engine.halo_layers)}")
        return layer

    async def predict(self, files: List[bytes], options: PredictOptions, deadline: float,
                      client_gone: Callable[[], bool] = lambda: False) -> List[dict]:
        """/predict's answer for each image, in order: ``predictions``, ``timing`` and, when asked,
        ``heatmaps``."""
        self.check_top_k(options.top_k)
        layer = self.heatmap_layer(options.heatmap_layer) if options.heatmaps else None
        picture_side = options.heatmap_max_side if options.heatmap_format == "png" else None
        sources, results = await self.classify(files, layer, deadline, client_gone, keep_sources=layer is not None,
                                               picture_side=picture_side)
        loop = asyncio.get_running_loop()
        answers = []
        for source, result in zip(sources, results):
            answer = dict(predictions=self.engine.top_k(result.probs, options.top_k),
                          timing=dict(queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3,
                                      batch_size=result.batch_size))
            if layer is not None:
                answer["heatmaps"] = await loop.run_in_executor(
                    self.preprocess_pool, self.engine.heatmaps, source, result.maps, layer, options.heatmap_format)
            answers.append(answer)
        return answers

    async def classify(self, images: Union[List[bytes], Tensor], layer: Optional[str], deadline: float,
                       client_gone: Callable[[], bool] = lambda: False, keep_sources: bool = False,
                       picture_side: Optional[int] = None) -> Tuple[List[Optional[SourceImage]], List[JobResult]]:
        """Each image's result (probabilities, and ``layer``'s maps when it names one), in order, and
        with ``keep_sources`` where its model input lies in it (and, with ``picture_side``, a copy to
        draw on; None for a preprocessed batch). ``images`` are encoded files, decoded here, or a
        batch the client preprocessed, (N, C, H, W) at the model's input size. ``deadline`` is a
        ``time.monotonic()``; ``client_gone`` says whether the asker left."""
        count = len(images)
        self.check_count(count)
        self.admit(count)
        self.metrics.in_flight.inc(count)
        try:
            return await self._classify(images, layer, deadline, client_gone, keep_sources, picture_side)
        finally:
            self.metrics.in_flight.dec(count)

    async def _classify(self, images: Union[List[bytes], Tensor], layer: Optional[str], deadline: float,
                        client_gone: Callable[[], bool], keep_sources: bool,
                        picture_side: Optional[int]) -> Tuple[List[Optional[SourceImage]], List[JobResult]]:
        loop = asyncio.get_running_loop()
        self.batcher.expect(len(images))  # the model thread may wait for these while they decode
        try:
            if isinstance(images, Tensor):
                tensors, sources = list(images), [None] * len(images)
            else:
                decode = (lambda data: self.engine.decode_with_source(data, picture_side)) if keep_sources else (
                    lambda data: (self.engine.decode(data), None))
                # Headers too are read on the loop only from few bytes: a GIF's header can hold any number
                # of extension blocks before its first frame.
                pixels = self._declared_pixels(images) if sum(map(len, images)) <= INLINE_DECODE_BYTES else None
                if pixels is not None and pixels <= self.settings.inline_decode_pixels:
                    tensors, sources = self._decode_all(images, decode, pixels)
                else:
                    tensors, sources = await loop.run_in_executor(self.preprocess_pool, self._decode_all, images,
                                                                  decode, pixels)
                if time.monotonic() > deadline:
                    raise ServiceError(504, "deadline_exceeded", "the request's deadline passed while its images "
                                       f"were decoded (HALO_REQUEST_TIMEOUT_MS={self.settings.request_timeout_ms:g})")
        except BaseException:
            self.batcher.withdraw(len(images))
            raise
        jobs = [Job(t, layer, deadline, loop, loop.create_future(), client_gone=client_gone) for t in tensors]
        try:
            self.batcher.submit(jobs, announced=True)
        except QueueFullError as e:
            raise ServiceError(503, "overloaded", str(e), retry_after=1) from e
        except ShuttingDownError as e:
            raise ServiceError(503, "shutting_down", str(e), retry_after=1) from e
        results = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if isinstance(failure, DeadlineExceededError):
            raise ServiceError(504, "deadline_exceeded",
                               f"{failure} (HALO_REQUEST_TIMEOUT_MS={self.settings.request_timeout_ms:g})")
        if isinstance(failure, ClientGoneError):
            raise ServiceError(499, "client_gone", str(failure))
        if failure is not None:
            raise failure
        return sources, results

    def _declared_pixels(self, files: List[bytes]) -> int:
        """The pixels of a request's images together, as their headers say (tens of microseconds an
        image, nothing decoded), refused when over the limits."""
        pixels = sum(self._image_step(files, i, self.engine.declared_pixels) for i in range(len(files)))
        if pixels > self.settings.max_request_pixels:
            raise ServiceError(413, "request_too_large", f"the images hold {pixels} pixels together, over "
                               f"HALO_MAX_REQUEST_PIXELS={self.settings.max_request_pixels}")
        return pixels

    def _decode_all(self, files: List[bytes], decode: Callable[[bytes], Tuple[Tensor, Optional[SourceImage]]],
                    pixels: Optional[int]) -> Tuple[List[Tensor], List[Optional[SourceImage]]]:
        """Decode and preprocess every image of a request, whose headers declared ``pixels`` (None: not
        read yet): the model inputs, and what ``decode`` keeps of each image besides. Small requests
        on the event loop (HALO_INLINE_DECODE_PIXELS): handing them to the preprocessing threads cost
        more than decoding them, as each handoff and each of the decoder's torch calls let go of
        Python's lock, and every thread waiting to take it back, the event loop's included, queued
        behind the others (at 32 clients of Fashion-MNIST PNGs, p95 19-24 ms instead of 29-34,
        docs/performance.md); larger ones in the threads, where Pillow and torch decode several at
        once."""
        if pixels is None:
            pixels = self._declared_pixels(files)
        with self.decoding.reserve(pixels):
            decoded = [self._image_step(files, i, decode) for i in range(len(files))]
        if pixels > LARGE_DECODE_PIXELS:
            release_free_memory()
        return [tensor for tensor, _ in decoded], [source for _, source in decoded]

    def _image_step(self, files: List[bytes], i: int, step: Callable[[bytes], object]):
        """``step`` on image ``i``, its failures as the service's errors, naming the image."""
        where = f"image {i}" if len(files) > 1 else "image"
        if not files[i]:
            raise ServiceError(400, "empty_image", f"{where} is empty")
        try:
            return step(files[i])
        except ImageTooLargeError as e:
            raise ServiceError(413, "image_too_large", f"{where}: {e} (HALO_MAX_PIXELS="
                               f"{self.settings.max_pixels})") from e
        except UnsupportedImageFormatError as e:
            raise ServiceError(415, "unsupported_image_format", f"{where}: {e}") from e
        except ImageDecodeError as e:
            raise ServiceError(400, "undecodable_image", f"{where}: {e}") from e
