"""Attention heatmaps from a halo attention layer's per-block maps.

A block's map (``HaloAttention.forward_with_maps``) is its attention probabilities averaged over
heads and over the block's query pixels: a (win x win) grid over the block's window that sums to 1.
Here those grids get their place: each window's position in feature-map and input-image
coordinates, one image-level map (every grid added at its window, the halo outside the map
dropped, normalized to sum 1, upsampled to the input size), and pictures of both.
"""
import io
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .attention import HaloSpec


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


def _colormap(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 along black, purple, orange, yellow (a perceptually ordered heat scale)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(heatmap: Tensor, picture: Image.Image, alpha: float = 0.55) -> bytes:
    """The image-level map, scaled to its maximum, colored and blended over ``picture`` (same size)."""
    values = heatmap.cpu().numpy()
    colored = Image.fromarray(_colormap(values / max(values.max(), 1e-12)))
    return _png(Image.blend(picture.convert("RGB"), colored, alpha))


def mosaic_png(maps: Tensor, blocks_hw: Tuple[int, int], cell: int = 8) -> bytes:
    """The per-block grids side by side as the blocks lie, each scaled to its own maximum."""
    blocks_h, blocks_w = blocks_hw
    win = maps.shape[-1]
    size = win * cell
    mosaic = Image.new("RGB", (blocks_w * (size + 1) + 1, blocks_h * (size + 1) + 1), (255, 255, 255))
    for index, grid in enumerate(maps.cpu().numpy()):
        tile = Image.fromarray(_colormap(grid / max(grid.max(), 1e-12))).resize((size, size), Image.Resampling.NEAREST)
        row, col = divmod(index, blocks_w)
        mosaic.paste(tile, (1 + col * (size + 1), 1 + row * (size + 1)))
    return _png(mosaic)


def picture_of_input(tensor: Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Image.Image:
    """The preprocessed (C, H, W) input, un-normalized back to an RGB picture."""
    pixels = tensor.float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
