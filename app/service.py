"""The lifespan object: everything the app holds while it runs (no module-level state)."""
import gc
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from model import CheckpointError

from .batcher import AdaptiveWindow, Batcher, BatchPolicy, FixedWindow, ForwardCosts
from .config import Settings
from .engine import Engine
from .errors import ServiceError
from .metrics import Metrics
from .pipeline import Pipeline

log = logging.getLogger("halo.service")


class Service:
    """Loads and warms the model in the background, so /healthz answers while that happens and
    /readyz says when it is done; owns the batcher and the preprocessing threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.preprocess_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="halo-preprocess")
        self.engine: Optional[Engine] = None
        self.batcher: Optional[Batcher] = None
        self.pipeline: Optional[Pipeline] = None
        self.ready = False
        self.stopping = False  # SIGTERM: no new work
        self.drained = True  # False when a shutdown ran out of time with images unanswered
        self.load_error: Optional[str] = None
        self._loader = threading.Thread(target=self._load, name="halo-loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def _load(self) -> None:
        try:
            engine = Engine(self.settings)
            costs = ForwardCosts(engine.warmup() if self.settings.warmup else {})
            policy = self._policy(costs)
            batcher = Batcher(engine.forward, policy, self.settings.max_queue, self.metrics, workers=engine.workers)
            batcher.start()
            self.engine, self.batcher = engine, batcher
            self.pipeline = Pipeline(engine, batcher, self.preprocess_pool, self.settings, self.metrics)
            self.freeze_startup_heap()
            self.ready = True
            forwards = engine.execution
            if engine.compiled is not None:
                forwards += (f" ({'loaded from' if engine.compile_cached else 'compiled into'} HALO_COMPILE_CACHE "
                             f"in {engine.compile_seconds:.1f} s"
                             + (f"; traced at batch sizes {engine.traced_sizes}, where it measured faster"
                                if engine.traced_sizes else "") + ")")
            if engine.keeps_freed_memory:
                forwards += ", the heap keeping freed memory"
            log.info("model %s (%s) ready on %s, halo attention: %s, forwards: %s", engine.name, engine.version,
                     engine.device, ", ".join(engine.attention_backends) or "none", forwards)
            for i, runner in enumerate(engine.runners or []):
                log.info("model worker %d: CUDA graphs of batch sizes %s", i, runner.captured or "none")
        except Exception as e:  # /readyz says why; the server (app/server.py) then exits with status 1
            self.load_error = f"{type(e).__name__}: {e}"
            if isinstance(e, (CheckpointError, ValueError)):  # a bad file or setting: its message says it all
                log.error("loading the model failed: %s", self.load_error)
            else:
                log.exception("loading the model failed")

    def _policy(self, costs: ForwardCosts) -> BatchPolicy:
        """HALO_BATCH_POLICY: adaptive by default, which served more images/s than the fixed window or as
        many at every level where the two act differently (docs/performance.md)."""
        s = self.settings
        if s.batch_policy == "adaptive":
            return AdaptiveWindow(s.max_batch_size, s.max_wait_ms / 1000, costs)
        return FixedWindow(s.max_batch_size, s.max_wait_ms / 1000, costs)

    @staticmethod
    def freeze_startup_heap() -> None:
        """Moves everything alive now (torch, the model, the app: about 380,000 objects for the
        shipped model) out of the garbage collector's sight. They live as long as the process, yet
        every full collection walked them all: one took 382 ms under load at 32 clients and set
        p99; frozen, the same collection takes 2 ms (docs/performance.md)."""
        gc.collect()
        gc.freeze()

    def wait_until_loaded(self, timeout: Optional[float] = None) -> bool:
        self._loader.join(timeout)
        return self.ready

    def not_ready_reason(self) -> str:
        if self.load_error:
            return f"model failed to load: {self.load_error}"
        return "the service is shutting down" if self.stopping else "model is loading"

    def not_ready_error(self) -> ServiceError:
        """The one 503 of every route that needs the model while it loads, after it failed to load,
        or (for /readyz) while the service stops."""
        return ServiceError(503, "not_ready", self.not_ready_reason(), retry_after=1)

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise self.not_ready_error()
        return self.engine

    def require_ready(self) -> Pipeline:
        """The pipeline, while the service takes requests (loaded, warmed up, not shutting down)."""
        if self.stopping:
            raise ServiceError(503, "shutting_down", self.not_ready_reason(), retry_after=1, close_connection=True)
        if not self.ready or self.pipeline is None:
            raise self.not_ready_error()
        return self.pipeline

    def stop_accepting(self) -> None:
        """New requests get 503 from now on (/readyz too: load balancers stop sending); accepted
        ones go on."""
        self.stopping = True
        self.ready = False

    def shutdown(self) -> None:
        """Refuse new work, answer every accepted image, stop the threads."""
        self.stop_accepting()
        if self.batcher is not None:
            self.batcher.close()
            self.drained = self.batcher.drain(timeout=self.settings.drain_seconds)
        self.preprocess_pool.shutdown(wait=True)
