"""A request's whole journey, from image bytes to answers, with no HTTP: check the options, decode
and preprocess in the thread pool, submit all of its images or none, await them, then top-k and
heatmap payloads. Every protocol the service speaks calls ``Pipeline.predict``; failures are
``ServiceError`` (status, code, message), mapped to responses in one place (app/main.py)."""
import asyncio
from concurrent.futures import Executor
from typing import Callable, List, Optional

from torch import Tensor

from model.decoding import ImageDecodeError, ImageTooLargeError, UnsupportedImageFormatError

from .batcher import Batcher, ClientGoneError, DeadlineExceededError, Job, QueueFullError, ShuttingDownError
from .config import Settings
from .engine import Engine
from .errors import ServiceError
from .schemas import PredictOptions


class Pipeline:
    def __init__(self, engine: Engine, batcher: Batcher, preprocess_pool: Executor, settings: Settings):
        self.engine, self.batcher, self.preprocess_pool, self.settings = engine, batcher, preprocess_pool, settings

    def check(self, images: int, options: PredictOptions) -> Optional[str]:
        """Checks what can be checked before decoding; the layer to take heatmaps from, if asked."""
        if images > self.settings.max_images_per_request:
            raise ServiceError(413, "too_many_images",
                               f"{images} images in one request; the limit is {self.settings.max_images_per_request}")
        if options.top_k > len(self.engine.labels):
            raise ServiceError(422, "invalid_options",
                               f"top_k must be at most {len(self.engine.labels)} (the class count)")
        if not options.heatmaps:
            return None
        layer = options.heatmap_layer or self.engine.default_heatmap_layer
        if layer not in self.engine.halo_layers:
            raise ServiceError(422, "invalid_options", f"heatmap_layer {layer!r} is not a halo attention layer; "
                                                       f"choose one of {', '.join(self.engine.halo_layers)}")
        return layer

    async def predict(self, files: List[bytes], options: PredictOptions, deadline: float,
                      client_gone: Callable[[], bool] = lambda: False) -> List[dict]:
        """One result per image, in order: ``predictions``, ``timing`` and, when asked, ``heatmaps``.
        ``deadline`` is a ``time.monotonic()``; ``client_gone`` says whether the asker left."""
        layer = self.check(len(files), options)
        loop = asyncio.get_running_loop()
        self.batcher.expect(len(files))  # the model thread may wait for these while they decode
        try:
            tensors = await loop.run_in_executor(self.preprocess_pool, self._decode_all, files)
        except BaseException:
            self.batcher.withdraw(len(files))
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
        answers = []
        for tensor, result in zip(tensors, results):
            answer = dict(predictions=self.engine.top_k(result.probs, options.top_k),
                          timing=dict(queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3,
                                      batch_size=result.batch_size))
            if layer is not None:
                answer["heatmaps"] = await loop.run_in_executor(
                    self.preprocess_pool, self.engine.heatmaps, tensor, result.maps, layer, options.heatmap_format)
            answers.append(answer)
        return answers

    def _decode_all(self, files: List[bytes]) -> List[Tensor]:
        """Decode and preprocess every image of a request (in the preprocessing pool)."""
        tensors = []
        for i, data in enumerate(files):
            where = f"image {i}" if len(files) > 1 else "image"
            if not data:
                raise ServiceError(400, "empty_image", f"{where} is empty")
            try:
                tensors.append(self.engine.decode(data))
            except ImageTooLargeError as e:
                raise ServiceError(413, "image_too_large", f"{where}: {e}") from e
            except UnsupportedImageFormatError as e:
                raise ServiceError(415, "unsupported_image_format", f"{where}: {e}") from e
            except ImageDecodeError as e:
                raise ServiceError(400, "undecodable_image", f"{where}: {e}") from e
        return tensors
