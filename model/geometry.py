"""Where a model input's pixels come from in the image it was made of, and maps drawn on the input
carried back onto that image's own pixel grid.

Every preprocessing the models use (model/transforms.py) is, geometrically, a crop of the image
scaled into a box of the input: the centre crop of a resized photo fills the whole input; the
Fashion-MNIST fit puts the object's box, aspect kept, in the middle of a black frame. So one
affine map per axis says it all, and the part of the image outside the crop is what the model
never saw.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Box = Tuple[float, float, float, float]  # left, top, right, bottom (pixel edges, right and bottom excluded)


@dataclass(frozen=True)
class InputGeometry:
    """``image_size``: (width, height) of the image given to the transform. ``crop``: the box of that
    image the model input holds, in its pixels. ``placed``: where that box lies in the input, in
    input pixels (the input's other pixels are padding)."""

    image_size: Tuple[int, int]
    crop: Box
    placed: Box

    def resized(self, size: Tuple[int, int]) -> "InputGeometry":
        """The same for the image resized to ``size`` (a thumbnail, or the file's own size when it was
        decoded at a reduced scale)."""
        sx, sy = size[0] / self.image_size[0], size[1] / self.image_size[1]
        left, top, right, bottom = self.crop
        return InputGeometry(tuple(size), (left * sx, top * sy, right * sx, bottom * sy), self.placed)

    def crop_box(self) -> Box:
        """The crop, clipped to the image: what of it the model saw."""
        width, height = self.image_size
        left, top, right, bottom = self.crop
        return max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom)


def to_image(values: Tensor, geometry: InputGeometry) -> Tuple[Tensor, Tensor]:
    """An (H, W) map over the model input -> (the map over the image, (height, width); where the
    image was seen, a bool mask of that shape). Each image pixel takes the map's value at the input
    point it went to (bilinear); pixels the crop left out are False in the mask and 0 in the map."""
    width, height = geometry.image_size
    left, top, right, bottom = geometry.crop
    p_left, p_top, p_right, p_bottom = geometry.placed
    in_h, in_w = values.shape
    xs = (torch.arange(width, dtype=torch.float64) + 0.5 - left) / (right - left) * (p_right - p_left) + p_left
    ys = (torch.arange(height, dtype=torch.float64) + 0.5 - top) / (bottom - top) * (p_bottom - p_top) + p_top
    seen = ((ys >= p_top) & (ys < p_bottom))[:, None] & ((xs >= p_left) & (xs < p_right))[None, :]
    # grid_sample's coordinates: -1 and 1 are the outer edges of the input's corner pixels.
    grid = torch.stack(torch.broadcast_tensors((xs / in_w * 2 - 1)[None, :], (ys / in_h * 2 - 1)[:, None]), -1)
    sampled = F.grid_sample(values[None, None].double(), grid[None], mode="bilinear", padding_mode="border",
                            align_corners=False)[0, 0]
    return torch.where(seen, sampled, torch.zeros_like(sampled)).to(values.dtype), seen
