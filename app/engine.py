"""The model and what surrounds it, with no HTTP: decode + preprocess, batched forward, top-k, heatmaps."""
import base64
import hashlib
import logging
import math
import os
import queue
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import Tensor

from model import HaloAttention, create_model, load_labels
from model import heatmaps as heatmap_pictures
from model.compiled import CompiledModel, load_or_compile
from model.cuda_runner import DeviceRunner, bucket_sizes
from model.halonet import HaloNet, shipped_weights
from model.inference import (halo_layer_inputs, prepare_for_inference, seeing_inputs, trace_for_inference,
                             trace_with_maps)
from model.decoding import load_image, open_image
from model.heatmaps import SourceImage
from model.transforms import build_geometric_transform, decode_min_side, to_mode

from .config import Settings
from .heap import keep_freed_memory

log = logging.getLogger("halo.engine")

# What /predict accepts, as PIL names its formats.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})  # MPO: multi-picture JPEG
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("HALO_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


def _file_digest(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# A model whose batch-1 forward takes longer than this on the threads below dominates the request
# path (2-6 core-ms per image on the machines measured): it gets every core, as a core kept for the
# requests would mostly idle, and one worker per core, as independent single-thread forwards use
# the cores better than one forward split over them: halonet26t on 2 cores gave 11.8 images/s from
# two workers against 9.3-10.3 from one forward on two threads (batches 1-8). The shipped model
# takes 1-7 ms and serves more with a core left to the requests (docs/performance.md). Such a model's
# heap also keeps what its forwards free (HALO_KEEP_FREED_MEMORY=auto, app/heap.py).
MODEL_BOUND_FORWARD_S = 0.02
# On a GPU: two model workers, each with its own stream, pinned buffers and CUDA graphs (model/cuda_runner.py):
# while one hands out its batch's answers and forms the next batch, the other's batch computes, and
# each copy to the device overlaps the other worker's compute.
CUDA_MODEL_WORKERS = 2
# The warm-up runs a batch size traced where its traced pass took less than this fraction of its compiled
# pass: one pass each, so a gain under the noise between two passes does not count.
TRACED_MARGIN = 0.95
# ... at batch sizes up to this one only: the compiled model's lead grew with the batch wherever measured
# (docs/performance.md), and timing halonet26t's larger sizes traced too cost 3 s of its start.
TRACED_CHECK_MAX_BATCH = 8
# The warm-up on the CPU stops doubling the batch once a size's pass took longer than this and served under
# WARMUP_GAIN times the best images/s of the smaller sizes: past the size where images/s stops growing, larger
# batches only cost start time (halonet26t's passes at 8, 16 and 32 were 7 of its 12 s), and the batcher's
# costs scale the largest measured size (ForwardCosts). A fast model measures every size.
WARMUP_SLOW_PASS_S = 0.25
WARMUP_GAIN = 1.1
# Largest logit difference from the eager model that a compiled model may show at start (float32 sums in
# another order: 1e-6 seen), as a fraction of the largest logit.
COMPILED_TOLERANCE = 1e-4


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_parallelism(model_bound: bool, workers: int = 0, threads: int = 0) -> Tuple[int, int]:
    """(model workers, torch threads of each), where 0 in the settings means: choose. A model that
    dominates gets one single-thread worker per core; otherwise one worker with every core but
    one: when the model's threads take every core, each parallel op waits for a descheduled
    thread (on 2 cores one thread served 17% more images/s at 32 clients with the shipped model
    and halved p99 at 1 client, docs/performance.md). Given threads alone mean one worker."""
    cores = usable_cores()
    if not workers:
        workers = cores if model_bound and not threads else 1
    if not threads:
        threads = max(1, (cores if model_bound else cores - 1) // workers)
    return workers, threads


class Engine:
    """Loads the configured model once (``__init__``, in one thread). After that every method below may be
    called from several worker threads at once: forwards only read the shared model, the hooks of the
    eager path act in their own thread only (``model.inference.seeing_inputs``), and each layer's
    heatmap graph is built once, under a lock."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.workers, self.threads = default_parallelism(False, settings.model_workers, settings.threads)
        if self.device.type == "cuda":
            self.workers = settings.model_workers or CUDA_MODEL_WORKERS
            torch.backends.cudnn.benchmark = True  # a few fixed shapes (buckets): the best algorithm each
        torch.set_num_threads(self.threads)
        self.dtype = DTYPES[settings.dtype]
        checkpoint = settings.checkpoint or shipped_weights(settings.model)
        model = create_model(settings.model, checkpoint=checkpoint, backend=settings.backend)
        self.version = _file_digest(checkpoint) if checkpoint is not None else "untrained"
        self.name = settings.model
        self.parameters = sum(p.numel() for p in model.parameters())
        self.model: HaloNet = prepare_for_inference(model, self.device, self.dtype, channels_last=True)
        self.cfg = self.model.pretrained_cfg
        # On CUDA, one runner per model worker, handed out per forward (a worker never waits: there are
        # as many as workers); None on CPU, where forwards run the traced graph or the eager model.
        self.runners: Optional[List[DeviceRunner]] = None
        self._free_runners: "queue.SimpleQueue[DeviceRunner]" = queue.SimpleQueue()
        if self.device.type == "cuda":
            self.runners = [DeviceRunner(self._probabilities, self.cfg.input_size, settings.max_batch_size,
                                         self.device, graphs=settings.cuda_graphs) for _ in range(self.workers)]
            for runner in self.runners:
                self._free_runners.put(runner)
        self.transform = build_geometric_transform(self.cfg)
        self.min_side = decode_min_side(self.cfg)  # a JPEG twice as large decodes at a reduced scale
        self.labels = load_labels(self.cfg.label_set) if self.cfg.label_set else [
            str(i) for i in range(self.cfg.num_classes)]
        self.halo_layers = dict(self.model.halo_layers())
        self.graph: Optional[torch.jit.ScriptModule] = None
        self.compiled: Optional[CompiledModel] = None  # HALO_COMPILE's model, built last: a runner per model worker
        self.compile_seconds: Optional[float] = None  # to compile it or load it from HALO_COMPILE_CACHE
        self.compile_cached = False  # it came from HALO_COMPILE_CACHE
        # Batch sizes (powers of two; a batch goes by the largest not above it) where the warm-up found the
        # traced graph faster than the compiled model (HALO_COMPILE=auto only): those run traced.
        self.traced_sizes: List[int] = []
        self.feature_sizes, self.layer_backends = self._halo_layer_sizes_and_backends()
        self.attention_backends: List[str] = sorted(set(self.layer_backends.values()))
        grids = {name: self._blocks(name) for name in self.halo_layers}
        multi_block = [name for name in self.halo_layers if grids[name][0] >= 2 and grids[name][1] >= 2]
        self.default_heatmap_layer: Optional[str] = multi_block[-1] if multi_block else (
            list(self.halo_layers)[-1] if self.halo_layers else None)
        self.graph = self._build_graph()
        # The graphs of forwards with heatmaps, by layer (None: those run eagerly). The default
        # layer's is built here, as the warm-up runs it; another layer's on its first request, under
        # the lock, as each costs a trace and its check (2 s for halonet26t on a core, 0.2 s for the
        # shipped model) that most layers, never asked for, are not worth.
        self._maps_graphs: Dict[str, Optional[torch.jit.ScriptModule]] = {}
        self._maps_graphs_lock = threading.Lock()
        if self.default_heatmap_layer is not None:
            self._maps_graph(self.default_heatmap_layer)
        self.keeps_freed_memory = False  # HALO_KEEP_FREED_MEMORY, as it resolved
        if self.device.type == "cpu":
            self._set_up_cpu_process()
        self.compiled = self._build_compiled()

    @property
    def execution(self) -> str:
        """What a forward without heatmaps runs: ``compiled`` (AOTInductor's program, ``HALO_COMPILE``),
        ``traced`` (one TorchScript graph), ``cuda_graphs``
        (CUDA graphs replayed per batch-size bucket) or ``eager``."""
        if self.compiled is not None:
            return "compiled"
        if self.graph is not None:
            return "traced"
        return "cuda_graphs" if self.runners and self.settings.cuda_graphs else "eager"

    def _halo_layer_sizes_and_backends(self) -> Tuple[Dict[str, Tuple[int, int]], Dict[str, str]]:
        """By halo attention layer: the (H, W) it sees at the model's input size (inputs are fixed-size),
        from one batch-1 pass, and the backend its dispatch picks ("auto" resolved) for such an input."""
        inputs = halo_layer_inputs(self.model, self._model_input(torch.zeros(1, *self.cfg.input_size)))
        sizes = {name: (shape[-2], shape[-1]) for name, shape in inputs.items()}
        backends = {name: self.halo_layers[name].backend_for(torch.empty(shape, device=self.device, dtype=self.dtype))
                    for name, shape in inputs.items()}
        return sizes, backends

    def _build_graph(self) -> Optional[torch.jit.ScriptModule]:
        """The model traced into one graph (``trace_for_inference``: a forward that does not take
        the GIL per op) when HALO_GRAPH allows it and the graph's answers are the eager model's,
        bit for bit, on a random batch; else None, and forwards run eagerly."""
        mode = self.settings.graph
        if mode == "eager" or (mode == "auto" and self.device.type != "cpu"):
            return None
        if "triton" in self.attention_backends:
            if mode == "traced":
                raise ValueError("HALO_GRAPH=traced cannot trace the triton attention backend (a kernel launched "
                                 "from Python); use HALO_GRAPH=eager or HALO_BACKEND=fused")
            return None
        graph = trace_for_inference(self.model, self._model_input(torch.zeros(2, *self.cfg.input_size)))
        check = self._check_batch()
        with torch.inference_mode():
            same = torch.equal(graph(check), self.model(check))
        if not same:
            if mode == "traced":
                raise ValueError("HALO_GRAPH=traced: the traced model's outputs differ from the eager model's")
            log.warning("the traced model's outputs differ from the eager model's: forwards run eagerly")
            return None
        return graph

    def _build_compiled(self) -> Optional[CompiledModel]:
        """The model compiled ahead of time (``model.compiled``) on the CPU unless ``HALO_COMPILE=off``, when
        its answers are the eager model's within ``COMPILED_TOLERANCE`` on a random batch; else None.
        With ``on``, a compile that fails or differs stops the start; with ``auto``, it is logged and
        forwards run as without, and a model without weights (random ones) is not compiled. (``auto``
        compiles every other model: it was x1.05-1.46 the traced graph's images/s in every row measured but
        one, level there, docs/performance.md; the warm-up checks it per batch size on this machine, ``warmup``.)"""
        mode = self.settings.compile
        if mode == "off" or self.device.type != "cpu" or "triton" in self.attention_backends:
            return None
        if mode == "auto" and self.version == "untrained":  # random weights, new each start: no cache would hit
            return None
        try:
            result = load_or_compile(self.model, self.cfg.input_size, self.workers, self.settings.compile_cache,
                                     variant=",".join(self.attention_backends))
            check = self._check_batch()
            with torch.inference_mode():
                expected = self.model(check)
                difference = (result.model(check) - expected).abs().max().item()
            if not difference <= COMPILED_TOLERANCE * max(1.0, expected.abs().max().item()):
                raise ValueError(f"the compiled model's logits differ from the eager model's by {difference:.3g}")
        except Exception as error:
            if mode == "on":
                raise ValueError(f"HALO_COMPILE=on: {type(error).__name__}: {error}") from error
            log.warning("compiling the model failed (%s: %s): forwards run %s", type(error).__name__, error,
                        "traced" if self.graph is not None else "eagerly")
            return None
        self.compile_seconds, self.compile_cached = result.seconds, result.cached
        log.info("compiled model %s in %.1f s (%s)", result.model.path, result.seconds,
                 "from the cache" if result.cached else "compiled now")
        return result.model

    def _maps_graph(self, layer: str) -> Optional[torch.jit.ScriptModule]:
        """The traced graph of ``(logits, maps of the rows asked at layer)`` (``trace_with_maps``), built
        on first use, or None where forwards with that layer's maps run eagerly: no graph
        (``self.graph``), or the traced answers differ from the eager model's."""
        if layer not in self.halo_layers:
            raise KeyError(f"no halo attention layer {layer!r}")
        if self.graph is None:
            return None
        if layer not in self._maps_graphs:  # checked again under the lock: another worker may be building it
            with self._maps_graphs_lock:
                if layer not in self._maps_graphs:
                    self._maps_graphs[layer] = self._build_maps_graph(layer)
        return self._maps_graphs[layer]

    @torch.inference_mode()
    def _build_maps_graph(self, layer: str) -> Optional[torch.jit.ScriptModule]:
        """``trace_with_maps`` of the model at ``layer`` when its logits and maps are the eager path's
        (``_eager_forward``), bit for bit, on a random batch where some of the rows ask; else None."""
        started = time.perf_counter()
        graph = trace_with_maps(self.model, layer, self._model_input(torch.zeros(2, *self.cfg.input_size)))
        check, rows = self._check_batch(), [0, 2]
        logits, maps = self._eager_forward(check, {layer: rows})
        graph_logits, graph_maps = graph(check, torch.tensor(rows))
        if not (torch.equal(graph_logits, logits)
                and all(torch.equal(m, maps[row]) for row, m in zip(rows, graph_maps.float().cpu()))):
            log.warning("the traced forward with the maps of %s differs from the eager model's: forwards with its "
                        "heatmaps run eagerly", layer)
            return None
        log.info("traced the forward with the heatmaps of %s in %.2f s", layer, time.perf_counter() - started)
        return graph

    def _check_batch(self) -> Tensor:
        return self._model_input(torch.randn(3, *self.cfg.input_size, generator=torch.Generator().manual_seed(0)))

    def _model_input(self, batch: Tensor) -> Tensor:
        return batch.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)

    def _probabilities(self, batch: Tensor) -> Tensor:
        """Class probabilities of a float32 batch on the model's device, left there: what a CUDA
        runner runs and captures (the cast to the model's dtype and layout included)."""
        return self.model(self._model_input(batch)).float().softmax(-1)

    def _set_up_cpu_process(self) -> None:
        """Model workers and threads (``default_parallelism``) and the heap (``HALO_KEEP_FREED_MEMORY``), by
        whether the model dominates the request path, where a setting leaves them to decide."""
        settings = self.settings
        parallelism_given = bool(settings.threads and settings.model_workers)
        model_bound = False
        if not parallelism_given or settings.keep_freed_memory == "auto":
            model_bound = self._batch_one_forward_seconds() > MODEL_BOUND_FORWARD_S
        if not parallelism_given:
            self.workers, self.threads = default_parallelism(model_bound, settings.model_workers, settings.threads)
            torch.set_num_threads(self.threads)
        if settings.keep_freed_memory == "on" or (settings.keep_freed_memory == "auto" and model_bound):
            self.keeps_freed_memory = keep_freed_memory()

    def _batch_one_forward_seconds(self) -> float:
        """The fastest of three batch-1 forwards (after the trace's, which warmed the model up): the
        least disturbed by whatever else the machine runs while the service starts."""
        inputs, times = torch.zeros(1, *self.cfg.input_size), []
        for _ in range(3):
            started = time.perf_counter()
            self.forward(inputs, [None])
            times.append(time.perf_counter() - started)
        return min(times)

    def _blocks(self, layer: str) -> Tuple[int, int]:
        h, w = self.feature_sizes[layer]
        block = self.halo_layers[layer].spec.block_size
        return h // block, w // block

    def map_shape(self, layer: str) -> Tuple[int, int, int]:
        """(blocks, win, win): the maps ``forward`` returns for one image at ``layer``."""
        rows, cols = self._blocks(layer)
        win = self.halo_layers[layer].spec.win_size
        return rows * cols, win, win

    def declared_pixels(self, data: bytes) -> int:
        """Width x height as the image's header says, nothing decoded; refused as ``decode`` would
        refuse it for its format or size."""
        image = open_image(data, max_pixels=self.settings.max_pixels, formats=ACCEPTED_FORMATS)
        return image.width * image.height

    def decode(self, data: bytes) -> Tensor:
        """Image file bytes -> preprocessed (C, H, W) tensor. Raises model.decoding's errors."""
        return self.transform(self._load(data))[0]

    def decode_with_source(self, data: bytes, picture_side: Optional[int] = None) -> Tuple[Tensor, SourceImage]:
        """``decode``, and where the input's pixels come from in the image, in the file's own pixels
        (upright); with ``picture_side``, a copy of the image to draw heatmaps on, its longer side at
        most that."""
        image = self._load(data)
        tensor, geometry = self.transform(image)
        header = open_image(data, max_pixels=self.settings.max_pixels, formats=ACCEPTED_FORMATS).size
        turned = (header[0] > header[1]) != (image.width > image.height) and header[0] != header[1]
        upright = header[::-1] if turned else header
        geometry = geometry.resized(upright)  # a large JPEG decodes reduced
        picture = None
        if picture_side is not None:
            drawn = image
            if max(image.size) < min(picture_side, max(upright)):
                # Decoded too reduced to draw on at the size asked: decoded again, larger, for the picture
                # only; the model's input stays the one every request of this file gets.
                drawn = load_image(data, max_pixels=self.settings.max_pixels, formats=ACCEPTED_FORMATS,
                                   min_side=math.ceil(picture_side * min(upright) / max(upright)))
            picture = to_mode(drawn, 3).copy()
            picture.thumbnail((picture_side, picture_side), Image.Resampling.LANCZOS)
        return tensor, SourceImage(geometry, picture)

    def _load(self, data: bytes) -> Image.Image:
        return load_image(data, max_pixels=self.settings.max_pixels, formats=ACCEPTED_FORMATS, min_side=self.min_side)

    @torch.inference_mode()
    def forward(self, images: Union[Tensor, Sequence[Tensor]],
                heatmap_layers: Sequence[Optional[str]]) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """Class probabilities (B, classes) of a batch of preprocessed images (a (B, C, H, W) tensor or
        its B rows) and, for each row that names a halo layer, that layer's per-block maps (blocks,
        win, win); None for the other rows. The maps come from the same forward: the layer's input,
        for those rows only, through its map-returning path (a second pass of that one layer for
        those rows, never the batch).

        On CUDA a batch without maps runs on a free ``DeviceRunner``: the rows stacked straight into
        its pinned buffer, then its bucket's CUDA graph (``HALO_CUDA_GRAPHS``).

        On CPU a batch without maps runs the compiled model where there is one (``HALO_COMPILE``), else
        the traced graph where there is one (``self.graph``), and a batch
        whose rows ask for one layer runs that layer's graph, which also returns those rows' maps
        (``_maps_graph``: the eager answers, bit for bit). A batch asking for several layers runs
        eagerly, with a hook on each, as does every batch with maps where there is no graph (triton,
        HALO_GRAPH=eager): requests asking for different layers, batched together, are too rare to be
        worth a graph for each set of layers."""
        rows_of: Dict[str, List[int]] = {}
        for row, layer in enumerate(heatmap_layers):
            if layer is not None:
                rows_of.setdefault(layer, []).append(row)
        if self.runners is not None and not rows_of:
            runner = self._free_runners.get()
            try:
                return runner.run(images), [None] * len(images)
            finally:
                self._free_runners.put(runner)
        batch = images if isinstance(images, Tensor) else torch.stack(list(images))
        x = self._model_input(batch)
        graph = self._maps_graph(next(iter(rows_of))) if len(rows_of) == 1 else None
        if graph is not None:
            (rows,) = rows_of.values()
            logits, layer_maps = graph(x, torch.tensor(rows))
            maps: List[Optional[Tensor]] = [None] * len(batch)
            for row, row_maps in zip(rows, layer_maps.float().cpu()):
                maps[row] = row_maps
        elif self.compiled is not None and not rows_of and self._compiled_at(len(batch)):
            logits, maps = self.compiled(x), [None] * len(batch)
        elif self.graph is not None and not rows_of:
            logits, maps = self.graph(x), [None] * len(batch)
        else:
            logits, maps = self._eager_forward(x, rows_of)
        return logits.float().softmax(-1).cpu(), maps

    def _eager_forward(self, x: Tensor, rows_of: Dict[str, List[int]]) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """Logits of the eager model and the maps of ``rows_of`` (rows by layer), from hooks on the layers."""
        maps: List[Optional[Tensor]] = [None] * len(x)

        def keep_maps(name: str, layer: HaloAttention, layer_input: Tensor) -> None:
            rows = rows_of[name]
            for row, row_maps in zip(rows, layer.forward_with_maps(layer_input[rows])[1].float().cpu()):
                maps[row] = row_maps

        with seeing_inputs(self.model, rows_of, keep_maps):
            return self.model(x), maps

    def top_k(self, probs: Tensor, k: int) -> List[dict]:
        scores, indices = probs.topk(k)
        return [dict(label=self.labels[i], index=i, score=s) for s, i in zip(scores.tolist(), indices.tolist())]

    def heatmaps(self, source: SourceImage, maps: Tensor, layer: str, fmt: str) -> dict:
        """The heatmap payload of one image: windows, where the input lies in the image, then the
        numbers or the pictures (drawn on ``source.picture``)."""
        spec = self.halo_layers[layer].spec
        feature_hw = self.feature_sizes[layer]
        image_hw = tuple(self.cfg.input_size[1:])
        image_map = heatmap_pictures.image_map(maps, spec, feature_hw, image_hw)
        geometry = source.geometry
        payload = dict(layer=layer, feature_size=list(feature_hw), image_size=list(image_hw),
                       blocks=list(self._blocks(layer)),
                       windows=[vars(w) for w in heatmap_pictures.windows(spec, feature_hw, image_hw)],
                       mapping=dict(original_size=list(geometry.image_size), crop=list(geometry.crop_box()),
                                    placed=list(geometry.placed)))
        if fmt == "array":
            payload.update(block_maps=maps.tolist(), image_map=image_map.tolist())
        else:
            payload.update(
                overlay_png=base64.b64encode(heatmap_pictures.overlay_png(image_map, source)).decode(),
                mosaic_png=base64.b64encode(heatmap_pictures.mosaic_png(maps, self._blocks(layer), spec)).decode())
        return payload

    def _compiled_at(self, size: int) -> bool:
        """Whether a batch of ``size`` runs the compiled model: unless the warm-up found the traced graph
        faster at the largest power of two not above it."""
        return not self.traced_sizes or 1 << (size.bit_length() - 1) not in self.traced_sizes

    def _traced_seconds(self, batch: Tensor) -> float:
        """The seconds of one traced pass on ``batch`` (the warm-up has run the graph at other sizes)."""
        x = self._model_input(batch)
        with torch.inference_mode():
            started = time.perf_counter()
            self.graph(x)
            return time.perf_counter() - started

    def warmup_sizes(self) -> List[int]:
        """The batch sizes a warm-up runs: the powers of two up to the maximum; on CUDA, every bucket
        (``model.cuda_runner.bucket_sizes``), so that each has its graph before the first request."""
        if self.runners is not None:
            return bucket_sizes(self.settings.max_batch_size)
        return [1 << i for i in range(self.settings.max_batch_size.bit_length())]

    def warmup(self) -> Dict[int, float]:
        """Forward passes at each of ``warmup_sizes``, and one with heatmaps. Returns the seconds of a
        pass at each size once it is warm (the first at a size is the slower one: allocations, the
        traced graph's profiling run; on CUDA, Triton's compiles, cuDNN's choice, every runner's
        capture): the batcher's first costs, which its admission of requests and the adaptive policy
        read. With ``HALO_COMPILE=auto`` each size up to ``TRACED_CHECK_MAX_BATCH`` is timed traced too,
        once (more passes would lengthen the start): where the traced graph was faster by more than
        ``TRACED_MARGIN`` allows, that size runs traced (``traced_sizes``). On the CPU, sizes past the one
        where images/s stopped growing are not run when their passes are slow (``WARMUP_SLOW_PASS_S``)."""
        seconds: Dict[int, float] = {}
        for size in self.warmup_sizes():
            if self.runners is None and seconds and self._warmup_flattened(seconds):
                break
            batch = torch.zeros(size, *self.cfg.input_size)
            for runner in self.runners or []:
                runner.prepare(size)
            if self.runners is None:
                self.forward(batch, [None] * size)
            started = time.perf_counter()
            self.forward(batch, [None] * size)
            seconds[size] = time.perf_counter() - started
            if self.compiled is not None and self.graph is not None and self.settings.compile == "auto" \
                    and size <= TRACED_CHECK_MAX_BATCH:
                traced = self._traced_seconds(batch)
                if traced < TRACED_MARGIN * seconds[size]:
                    self.traced_sizes.append(size)
                    seconds[size] = traced
        if self.default_heatmap_layer:
            self.forward(torch.zeros(1, *self.cfg.input_size), [self.default_heatmap_layer])
        return seconds

    @staticmethod
    def _warmup_flattened(seconds: Dict[int, float]) -> bool:
        """The largest size timed so far was slow and served under ``WARMUP_GAIN`` times the images/s of
        the best smaller size: a larger one would cost more start than it tells."""
        largest = max(seconds)
        if seconds[largest] <= WARMUP_SLOW_PASS_S or len(seconds) < 2:
            return False
        best_before = max(size / seconds[size] for size in seconds if size < largest)
        return largest / seconds[largest] < WARMUP_GAIN * best_before
