"""The model and what surrounds it, with no HTTP: decode + preprocess, batched forward, top-k, heatmaps."""
import base64
import hashlib
import os
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from model import HaloAttention, create_model, load_labels
from model import heatmaps as heatmap_pictures
from model.halonet import HaloNet, shipped_weights
from model.inference import prepare_for_inference
from model.transforms import build_transform, load_image

from .config import Settings

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
# requests would mostly idle. halonet26t takes 130-170 ms on 2 cores and served 11.2 images/s at 8
# clients with both against 6.6 with one; the shipped model takes 1-7 ms and serves more with a
# core left to the requests (docs/performance.md).
MODEL_BOUND_FORWARD_S = 0.02


def default_model_threads(forward_s: Optional[float] = None) -> int:
    """One torch thread per usable core but one, or every core once a batch-1 forward has been
    timed at over MODEL_BOUND_FORWARD_S. The request path (event loop, parsing, decoding) runs
    beside the model; when the model's threads take every core, each parallel op waits for a
    descheduled thread: on 2 cores one thread served 17% more images/s at 32 clients with the
    shipped model and halved p99 at 1 client (docs/performance.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if forward_s is not None and forward_s > MODEL_BOUND_FORWARD_S:
        return cores
    return max(1, cores - 1)


class Engine:
    """Loads the configured model once; every method below is safe to call from worker threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.threads = settings.threads or default_model_threads()
        torch.set_num_threads(self.threads)
        self.device = resolve_device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        checkpoint = settings.checkpoint or shipped_weights(settings.model)
        model = create_model(settings.model, checkpoint=checkpoint, backend=settings.backend)
        self.version = _file_digest(checkpoint) if checkpoint is not None else "untrained"
        self.name = settings.model
        self.parameters = sum(p.numel() for p in model.parameters())
        self.model: HaloNet = prepare_for_inference(model, self.device, self.dtype, channels_last=True)
        self.cfg = self.model.pretrained_cfg
        self.transform = build_transform(self.cfg)
        self.labels = load_labels(self.cfg.label_set) if self.cfg.label_set else [
            str(i) for i in range(self.cfg.num_classes)]
        self.halo_layers = dict(self.model.halo_layers())
        self.feature_sizes, self.attention_backends = self._trace_halo_layers()
        if not settings.threads and self.device.type == "cpu":
            self.threads = default_model_threads(self._batch_one_forward_seconds())
            torch.set_num_threads(self.threads)
        grids = {name: self._blocks(name) for name in self.halo_layers}
        multi_block = [name for name in self.halo_layers if grids[name][0] >= 2 and grids[name][1] >= 2]
        self.default_heatmap_layer: Optional[str] = multi_block[-1] if multi_block else (
            list(self.halo_layers)[-1] if self.halo_layers else None)

    def _trace_halo_layers(self) -> Tuple[Dict[str, Tuple[int, int]], List[str]]:
        """One forward pass at the model's input size (inputs are fixed-size): the (H, W) each halo
        attention layer sees, and the backends they run (what "auto" resolves to), sorted."""
        sizes: Dict[str, Tuple[int, int]] = {}
        backends: Set[str] = set()

        def see(name: str, layer: HaloAttention, x: Tensor) -> None:
            sizes[name] = tuple(x.shape[-2:])
            backends.add(layer.backend_for(x))

        with self._watching(self.halo_layers, see):
            self.forward(torch.zeros(1, *self.cfg.input_size), [None])
        return sizes, sorted(backends)

    @contextmanager
    def _watching(self, layers: Iterable[str], see: Callable[[str, HaloAttention, Tensor], None]) -> Iterator[None]:
        """Call ``see(name, layer, input)`` at every forward of the named halo layers, while inside."""
        handles = [self.halo_layers[name].register_forward_hook(
            lambda layer, inputs, _output, name=name: see(name, layer, inputs[0])) for name in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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

    def decode(self, data: bytes) -> Tensor:
        """Image file bytes -> preprocessed (C, H, W) tensor. Raises model.transforms' errors."""
        image = load_image(data, max_pixels=self.settings.max_pixels, formats=ACCEPTED_FORMATS)
        return self.transform(image)

    @torch.inference_mode()
    def forward(self, batch: Tensor, heatmap_layers: Sequence[Optional[str]]) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """Class probabilities (B, classes) and, for each row that names a halo layer, that layer's
        per-block maps (blocks, win, win); None for the other rows. The maps come from the same
        forward: the layer's input, for those rows only, through its map-returning path."""
        maps: List[Optional[Tensor]] = [None] * len(batch)
        rows_of: Dict[str, List[int]] = {}
        for row, layer in enumerate(heatmap_layers):
            if layer is not None:
                rows_of.setdefault(layer, []).append(row)

        def keep_maps(name: str, layer: HaloAttention, x: Tensor) -> None:
            rows = rows_of[name]
            for row, row_maps in zip(rows, layer.forward_with_maps(x[rows])[1].float().cpu()):
                maps[row] = row_maps

        with self._watching(rows_of, keep_maps):
            x = batch.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
            probs = self.model(x).float().softmax(-1).cpu()
        return probs, maps

    def top_k(self, probs: Tensor, k: int) -> List[dict]:
        scores, indices = probs.topk(k)
        return [dict(label=self.labels[i], index=i, score=s) for s, i in zip(scores.tolist(), indices.tolist())]

    def heatmaps(self, inputs: Tensor, maps: Tensor, layer: str, fmt: str) -> dict:
        """The heatmap payload of one image: windows, then the numbers or the pictures."""
        spec = self.halo_layers[layer].spec
        feature_hw = self.feature_sizes[layer]
        image_hw = tuple(self.cfg.input_size[1:])
        image_map = heatmap_pictures.image_map(maps, spec, feature_hw, image_hw)
        payload = dict(layer=layer, feature_size=list(feature_hw), image_size=list(image_hw),
                       blocks=list(self._blocks(layer)),
                       windows=[vars(w) for w in heatmap_pictures.windows(spec, feature_hw, image_hw)])
        if fmt == "array":
            payload.update(block_maps=maps.tolist(), image_map=image_map.tolist())
        else:
            picture = heatmap_pictures.picture_of_input(inputs, self.cfg.mean, self.cfg.std)
            payload.update(
                overlay_png=base64.b64encode(heatmap_pictures.overlay_png(image_map, picture)).decode(),
                mosaic_png=base64.b64encode(heatmap_pictures.mosaic_png(maps, self._blocks(layer))).decode())
        return payload

    def warmup(self) -> None:
        """A forward pass at each power-of-two batch size up to the maximum, and one with heatmaps."""
        size = 1
        while size <= self.settings.max_batch_size:
            self.forward(torch.zeros(size, *self.cfg.input_size), [None] * size)
            size *= 2
        if self.default_heatmap_layer:
            self.forward(torch.zeros(1, *self.cfg.input_size), [self.default_heatmap_layer])
