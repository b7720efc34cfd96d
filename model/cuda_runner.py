"""A model's forward on a CUDA device as a serving worker runs it: batches padded to a few bucket
sizes, each bucket's forward captured once as a CUDA graph and replayed, inputs staged in pinned
host memory and copied on the worker's own stream.

Why: a HaloNet forward launches a few hundred small kernels (convolutions, the Triton attention
kernel, element-wise ops); launched one by one from Python, a small batch costs more in launches
than on the GPU. A graph replays them all with one call. A graph is fixed to its input's shape,
so batches are padded up to the next bucket (``bucket_sizes``: at most a third of a batch is
padding). Each worker has its own stream: one worker's copy of its batch to the device runs while
another worker's batch computes.

The runner is device-generic so that its logic (buckets, padding, when to capture, the fallback
when a capture fails) is tested on CPU with a stand-in for ``capture_cuda_graph``.
"""
import logging
from contextlib import nullcontext
from typing import Callable, Dict, List, Sequence, Set, Union

import torch
from torch import Tensor

log = logging.getLogger("halo.cuda")

# (the forward, its static input) -> a replay: runs the forward again on whatever the static input
# holds now, and returns its output (the same tensor every time).
Capture = Callable[[Callable[[Tensor], Tensor], Tensor], Callable[[], Tensor]]


def bucket_sizes(max_batch: int) -> List[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... (powers of two and one and a half times them) up to
    ``max_batch``, which is always the last: padding a batch to the next costs at most a third of
    it, with two graphs per doubling."""
    sizes, power = {1, max_batch}, 2
    while power < max_batch:
        sizes.update(s for s in (power, power * 3 // 2) if s < max_batch)
        power *= 2
    return sorted(sizes)


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size`` images."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"a batch of {size} is larger than the largest bucket ({buckets[-1]})")


def capture_cuda_graph(forward: Callable[[Tensor], Tensor], static_input: Tensor) -> Callable[[], Tensor]:
    """``forward(static_input)`` captured as a CUDA graph, on the current stream's device. The caller
    has run it eagerly at this shape before (Triton compiles its kernels and cuDNN picks its
    algorithms on first use, neither of which a capture may do). Captured on the current stream (the
    worker's own: by default every capture would share one side stream, and two workers may capture
    at once); ``thread_local``: another worker's CUDA calls meanwhile (its eager pass, an allocation)
    are not ours and must not invalidate this capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
        static_output = forward(static_input)

    def replay() -> Tensor:
        graph.replay()
        return static_output

    return replay


class DeviceRunner:
    """One model worker's forward on ``device``: ``run(images)`` gives ``forward`` of the images as a
    host tensor. ``forward`` takes a (bucket, *input_shape) float32 batch on the device and returns
    a (bucket, ...) tensor there; rows past the images are padding, their outputs dropped.

    A bucket's first batch runs eagerly on the whole padded bucket (its warm-up), its second is
    captured (``capture``) and every later one replays the graph. A bucket whose capture fails runs
    eagerly from then on, on the images only, and says so once; so does every bucket with
    ``graphs`` off. Not thread-safe: one runner per worker (``app.engine.Engine`` hands them out)."""

    def __init__(self, forward: Callable[[Tensor], Tensor], input_shape: Sequence[int], max_batch: int,
                 device: Union[str, torch.device], graphs: bool = True, capture: Capture = capture_cuda_graph):
        self.forward = forward
        self.input_shape = tuple(input_shape)
        self.buckets = bucket_sizes(max_batch)
        self.device = torch.device(device)
        self.graphs = graphs
        self._capture = capture
        on_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._pin = on_cuda  # pinned host memory: the copy to the device runs while the thread goes on
        self._host: Dict[int, Tensor] = {}  # by bucket: where the images are stacked
        self._inputs: Dict[int, Tensor] = {}  # by bucket: the device batch (a graph's static input)
        self._replays: Dict[int, Callable[[], Tensor]] = {}
        self._warm: Set[int] = set()
        self._failed: Set[int] = set()

    @property
    def captured(self) -> List[int]:
        """The buckets that replay a graph."""
        return sorted(self._replays)

    @torch.inference_mode()  # its buffers are inference tensors: every use must be too
    def run(self, images: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """``forward`` of the images (a (B, *input_shape) batch, or its B rows) on the host."""
        count = len(images)
        bucket = bucket_for(count, self.buckets)
        host = self._buffer(self._host, bucket, torch.device("cpu"), pin=self._pin)[:count]
        if isinstance(images, Tensor):
            host.copy_(images)
        else:
            torch.stack(list(images), out=host)  # straight into the pinned buffer: no other copy
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            static = self._buffer(self._inputs, bucket, self.device, pin=False)
            static[:count].copy_(host, non_blocking=self._pin)
            return self._forward(bucket, static, count)[:count].cpu()  # waits for this stream only

    def _forward(self, bucket: int, static: Tensor, count: int) -> Tensor:
        replay = self._replays.get(bucket)
        if replay is not None:
            return replay()
        if not self.graphs or bucket in self._failed:
            return self.forward(static[:count])
        if bucket not in self._warm:
            self._warm.add(bucket)
            return self.forward(static)  # the whole bucket: what the capture will run, warmed up
        try:
            replay = self._capture(self.forward, static)
        except Exception as error:  # a graph is an optimisation: the forward still answers
            self._failed.add(bucket)
            log.warning("capturing the CUDA graph of batch size %d failed (%s: %s): that size runs eagerly",
                        bucket, type(error).__name__, error)
            return self.forward(static[:count])
        self._replays[bucket] = replay
        return replay()

    def _buffer(self, buffers: Dict[int, Tensor], bucket: int, device: torch.device, pin: bool) -> Tensor:
        """The bucket's batch buffer, allocated on first use: zeros, so padding rows are finite."""
        if bucket not in buffers:
            buffers[bucket] = torch.zeros(bucket, *self.input_shape, device=device, pin_memory=pin)
        return buffers[bucket]

    def prepare(self, size: int) -> None:
        """Run a batch of ``size`` until its bucket replays a graph (or runs eagerly for good): what a
        warm-up does, so that no request pays for a capture."""
        batch = torch.zeros(size, *self.input_shape)
        for _ in range(2):
            self.run(batch)
