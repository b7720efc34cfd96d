"""Every knob of the service, in one place: environment variables with the HALO_ prefix."""
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What a request that started just before its deadline still needs to be answered and written out
# once its deadline has passed (an answer or a 504, then the socket's last bytes); part of the drain.
DRAIN_MARGIN_S = 5.0


class Settings(BaseSettings):
    """Service settings. Each field is read from ``HALO_<NAME>`` (e.g. ``HALO_MAX_BATCH_SIZE``)."""

    model_config = SettingsConfigDict(env_prefix="HALO_", protected_namespaces=())

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    model: str = Field("halonet_compact", description="registry name of the model to serve")
    checkpoint: Optional[Path] = Field(
        None, description="weights file (.safetensors/.pth); default: the shipped weights of models that have them")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="half precision on GPU only")
    backend: Literal["auto", "fused", "cpp", "reference", "triton"] = Field(
        "auto", description="halo attention backend")
    threads: int = Field(
        0, ge=0, description="torch CPU threads of each model worker; 0 = the cores but one (at least 1) shared "
                             "among the workers, so that the event loop and image decoding keep a core, or one "
                             "each when the model dominates (see model_workers)")
    model_workers: int = Field(
        0, ge=0, description="model threads, each forming and computing its own batches; 0 = one, or one per core "
                             "when a batch-1 forward takes over 20 ms at start (the model dominates the request path); "
                             "on CUDA two, each with its own stream (one's copies and answers overlap the other's "
                             "compute)")
    graph: Literal["auto", "traced", "eager"] = Field(
        "auto", description="traced: the model as one TorchScript graph, whose forward does not take the GIL per "
                            "op (checked bit for bit against the eager model at start); eager: plain PyTorch; "
                            "auto: traced on CPU when the check passes, eager otherwise")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="on CPU: on: the model compiled ahead of time by AOTInductor (one program for every batch "
                            "size, weights frozen; checked against the eager model at start), from compile_cache or "
                            "compiled into it (seconds to minutes, once); auto: on for models with weights (not random "
                            "ones), and each batch size where the warm-up found the traced graph faster runs it; the "
                            "ready log and /v1/model report what runs; off: the traced or eager model. Ignored on "
                            "CUDA")
    compile_cache: Optional[Path] = Field(
        None, description="where compiled models are kept, one file per model, weights, machine and torch version; "
                          "default $XDG_CACHE_HOME/halonet/compiled (~/.cache/halonet/compiled); the Docker image "
                          "ships one, compiled at build time")
    keep_freed_memory: Literal["auto", "on", "off"] = Field(
        "auto", description="on CPU: on: the process's C heap (glibc) keeps what a forward frees for the next one "
                            "instead of handing it back to the system (mallopt: no blocks mapped on their own, no "
                            "trimming), so that forwards do not page-fault on fresh memory; the process then holds "
                            "what its largest forwards needed at once; auto: on where the model dominates the request "
                            "path (a batch-1 forward over 20 ms at start: the forwards whose blocks run to tens of "
                            "MB), off for a small model, which served fewer images/s with it")
    cuda_graphs: bool = Field(
        True, description="on CUDA: capture each batch-size bucket's forward (1, 2, 3, 4, 6, 8, 12, ... up to "
                          "max_batch_size, batches padded up to the next) as a CUDA graph after its first pass, "
                          "and replay it: one launch instead of hundreds; a size whose capture fails runs eagerly. "
                          "Ignored on CPU")
    batch_policy: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="adaptive: wait for images on their way only while that lowers their expected "
                                "latency (from the measured forward time per batch size, the gap between arriving "
                                "images and how late a waiting model thread wakes), never past max_wait_ms, batches "
                                "no larger than where images/s stops growing; fixed: wait up to max_wait_ms for "
                                "images on their way, batches up to max_batch_size")
    max_batch_size: int = Field(32, ge=1, description="most images in one forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="longest wait for a batch to fill once it has one image")
    max_queue: int = Field(512, ge=1, description="images waiting at most; beyond it requests get 503")
    max_queue_wait_ms: float = Field(
        5000, gt=0, description="admission: a request whose images would wait longer than this for the model "
                                "(images ahead of them / the measured images per second) is refused at once with "
                                "503 and Retry-After, before its body is read or decoded")
    request_timeout_ms: float = Field(
        30000, gt=0, description="deadline of a request from its headers on: reading the body, decoding and "
                                 "queueing; past it the answer is 408 (body still arriving) or 504")
    header_timeout_s: float = Field(
        10, gt=0, description="a connection's request headers must arrive in full within this time of it opening "
                              "(or of the previous answer on it); else it is closed (with 408 if it had begun)")
    body_timeout_s: float = Field(
        10, gt=0, description="longest pause between two parts of a request body; then 408 (the whole body must "
                              "also arrive within the request's deadline)")
    keep_alive_s: float = Field(5, gt=0, description="an idle keep-alive connection is closed after this")
    shutdown_grace_s: float = Field(
        1, ge=0, description="after SIGTERM, how long the port stays open answering new requests 503 (with "
                             "Connection: close) before it closes, so that a client connecting just then gets an "
                             "answer instead of a reset; then the accepted requests are answered and it exits 0")
    max_body_bytes: int = Field(20 * 2 ** 20, ge=1, description="largest request body")
    max_pixels: int = Field(40_000_000, ge=1, description="largest image (width x height), checked before decoding")
    max_request_pixels: int = Field(
        100_000_000, ge=1, description="most pixels of all the images of one request (from their headers, before "
                                       "decoding); beyond it 413")
    max_decoding_pixels: int = Field(
        120_000_000, ge=1, description="most pixels being decoded at once, all requests together: a request that "
                                       "would go over it is refused with 503 and Retry-After, so that a few huge "
                                       "images cannot hold the decoding threads and memory while small ones wait")
    max_images_per_request: int = Field(64, ge=1, description="most images in one request")
    preprocess_threads: int = Field(4, ge=1, description="threads that decode and preprocess images (those of "
                                                         "requests over inline_decode_pixels) and draw heatmaps")
    inline_decode_pixels: int = Field(
        65536, ge=0, description="a request whose images hold at most this many pixels together (by their headers), "
                                 "in files of at most 64 KiB together, is decoded on the event loop, not handed to "
                                 "the preprocessing threads: for small images the handoff costs more than the "
                                 "decode (0: every request in the threads)")
    warmup: bool = Field(
        True, description="before /readyz says ready, run the model at batch sizes 1, 2, 4, ... (the powers of two up "
                          "to max_batch_size; on CUDA every bucket, each captured as a CUDA graph by every model "
                          "worker) and once with heatmaps; the timings seed the batcher's forward costs")
    demo_page: bool = Field(True, description="serve the demo page at / (its files at /static/): drop images in a "
                                              "browser, see the top classes and heatmaps")
    log_level: str = Field("info", description="uvicorn and access log level")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        """HALO_CHECKPOINT="" (as compose files and shells often pass it) means: no checkpoint given."""
        return None if value == "" else value

    @property
    def drain_seconds(self) -> float:
        """How long a graceful shutdown waits for accepted requests: their deadline and DRAIN_MARGIN_S.
        A supervisor's grace period before SIGKILL (compose's stop_grace_period) must be longer than
        this and shutdown_grace_s together."""
        return self.request_timeout_ms / 1000 + DRAIN_MARGIN_S
