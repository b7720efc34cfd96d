"""Attention heatmaps from a halo attention layer's per-block maps.

A block's map (``HaloAttention.forward_with_maps``) is its attention probabilities averaged over
heads and over the block's query pixels: a (win x win) grid over the block's window that sums to 1.
Here those grids get their place: each window's position in feature-map and input-image
coordinates, one image-level map (every grid added at its window, the halo outside the map
dropped, normalized to sum 1, upsampled to the input size), and pictures of both: the map over the
user's own image, carried back through the preprocessing (model/geometry.py), and the blocks'
windows side by side.
"""
import io
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .attention import HaloSpec
from .geometry import InputGeometry, to_image


@dataclass(frozen=True)
class Window:
    """Where one block's window lies: rows and columns [top, top + size) and [left, left + size)."""

    block_row: int
    block_col: int
    feature_top: int
    feature_left: int
    feature_size: int
    image_top: float
    image_left: float
    image_size: float


def windows(spec: HaloSpec, feature_hw: Tuple[int, int], image_hw: Tuple[int, int]) -> List[Window]:
    """The windows of every block, row-major, in the layer's input-map and the input image's pixels."""
    scale = image_hw[0] / feature_hw[0]
    bs, halo, win = spec.block_size, spec.halo_size, spec.win_size
    return [Window(i, j, i * bs - halo, j * bs - halo, win, (i * bs - halo) * scale, (j * bs - halo) * scale,
                   win * scale)
            for i in range(feature_hw[0] // bs) for j in range(feature_hw[1] // bs)]


def image_map(maps: Tensor, spec: HaloSpec, feature_hw: Tuple[int, int], image_hw: Tuple[int, int]) -> Tensor:
    """(blocks, win, win) grids -> one (H_image, W_image) map that sums to 1."""
    H, W = feature_hw
    halo = spec.halo_size
    canvas = maps.new_zeros(H + 2 * halo, W + 2 * halo)
    for grid, window in zip(maps, windows(spec, feature_hw, image_hw)):
        top, left = window.feature_top + halo, window.feature_left + halo
        canvas[top:top + spec.win_size, left:left + spec.win_size] += grid
    inside = canvas[halo:halo + H, halo:halo + W]
    upsampled = F.interpolate(inside[None, None], size=image_hw, mode="bilinear", align_corners=False)[0, 0]
    return upsampled / upsampled.sum().clamp_min(1e-12)


def _heat_scale(levels: int = 256) -> np.ndarray:
    """(levels, 3) uint8: black, purple, orange, yellow (a perceptually ordered heat scale)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    position = np.linspace(0, len(stops) - 1, levels)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[:, None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


HEAT_SCALE = _heat_scale()


def _colormap(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 on the heat scale (a lookup: a photo-sized map in about a millisecond)."""
    return HEAT_SCALE[np.rint(np.clip(values, 0, 1) * (len(HEAT_SCALE) - 1)).astype(np.intp)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class SourceImage:
    """The image a model input was made of: where the input's pixels come from in it, in the file's
    own pixels, and a copy to draw on (RGB, possibly smaller; None when no picture is wanted)."""

    geometry: InputGeometry
    picture: Optional[Image.Image] = None


def overlay_png(heatmap: Tensor, source: SourceImage, alpha: float = 0.65) -> bytes:
    """The image-level map (over the model input) drawn on the user's picture: carried back through
    the preprocessing, scaled to its maximum, coloured, blended more where it is higher; what the
    model never saw (cropped away) greyed and hatched; a legend strip below."""
    picture = source.picture.convert("RGB")
    values, seen = to_image(heatmap.float().cpu(), source.geometry.resized(picture.size))
    values, seen = values.numpy(), seen.numpy()
    values = values / max(float(values.max()), 1e-12)
    base = np.asarray(picture, dtype=np.float32)
    weight = (alpha * np.sqrt(values))[..., None]
    drawn = base * (1 - weight) + _colormap(values).astype(np.float32) * weight
    rows, cols = np.indices(seen.shape)
    hatch = ((rows + cols) % 8 < 2)[..., None]
    drawn = np.where(seen[..., None], drawn, np.where(hatch, 200.0, base.mean(-1, keepdims=True) * 0.35))
    image = _with_legend(Image.fromarray(np.clip(drawn, 0, 255).astype(np.uint8)), not seen.all())
    # A palette (fast octree: 2 ms, where median cut took 110) keeps a photo's overlay at a few tens of kB.
    return _png(image.quantize(256, method=Image.Quantize.FASTOCTREE))


def _with_legend(image: Image.Image, unseen: bool) -> Image.Image:
    """``image`` with a legend in its lower left corner, when it is large enough to hold one: the
    colour scale from low to high attention, and what the hatching means when some of the picture
    was cropped away. The picture keeps its size, so its aspect ratio is the image's."""
    note = "hatched: not seen" if unseen else ""
    width = 112 + 6 * len(note)
    if image.width < width or image.height < 64:
        return image
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    top = image.height - 16
    draw.rectangle((0, top, width, image.height), fill=(255, 255, 255))
    draw.text((3, top + 2), "low", fill=(0, 0, 0), font=font)
    image.paste(Image.fromarray(_colormap(np.linspace(0, 1, 48)[None].repeat(10, 0))), (26, top + 3))
    draw.text((78, top + 2), "high", fill=(0, 0, 0), font=font)
    if note:
        draw.text((110, top + 2), note, fill=(80, 80, 80), font=font)
    return image


def mosaic_png(maps: Tensor, blocks_hw: Tuple[int, int], spec: HaloSpec, window_px: int = 64) -> bytes:
    """The per-block grids side by side as the blocks lie, each scaled to its own maximum, each
    window about ``window_px`` across, its block's own query region outlined in white."""
    blocks_h, blocks_w = blocks_hw
    win = maps.shape[-1]
    cell = max(2, math.ceil(window_px / win))
    size, gap = win * cell, 3
    mosaic = Image.new("RGB", (blocks_w * (size + gap) + gap, blocks_h * (size + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(mosaic)
    for index, grid in enumerate(maps.cpu().numpy()):
        tile = Image.fromarray(_colormap(grid / max(grid.max(), 1e-12))).resize((size, size), Image.Resampling.NEAREST)
        row, col = divmod(index, blocks_w)
        left, top = gap + col * (size + gap), gap + row * (size + gap)
        mosaic.paste(tile, (left, top))
        query = spec.halo_size * cell, (spec.halo_size + spec.block_size) * cell - 1
        draw.rectangle((left + query[0], top + query[0], left + query[1], top + query[1]), outline=(255, 255, 255))
    return _png(mosaic)
