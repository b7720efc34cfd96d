"""Maps over the model input carried back onto the image sent (model/geometry.py), through every
preprocessing the models use: a synthetic image whose only content is a square gives, for the map
that is the preprocessed input itself, its largest values inside that square; what a crop left out
is marked unseen; and the overlay is drawn on the image at its own size."""
import io
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model
from model.geometry import to_image
from model.heatmaps import SourceImage, overlay_png
from model.transforms import build_geometric_transform

# (model, image size, square's box (left, top, right, bottom), square's colour, background)
CASES = {
    "center crop, landscape": ("halonet26t", (640, 360), (420, 140, 470, 190), 255, 0),
    "center crop, portrait": ("halonet26t", (300, 700), (60, 300, 110, 350), 255, 0),
    "center crop, small": ("halonet26t", (90, 120), (10, 70, 30, 90), 255, 0),
    "object fit, light object": ("halonet_compact", (500, 300), (300, 60, 380, 200), 230, 10),
    "object fit, dark object (inverted)": ("halonet_compact", (240, 320), (40, 200, 90, 260), 20, 245),
    "already framed 28 x 28": ("halonet_compact", (28, 28), (15, 4, 22, 11), 255, 0),
}


def square_image(size: Tuple[int, int], box: Tuple[int, int, int, int], colour: int, background: int) -> Image.Image:
    pixels = np.full((size[1], size[0], 3), background, dtype=np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = colour
    return Image.fromarray(pixels)


@pytest.mark.parametrize("model_name, size, box, colour, background", CASES.values(), ids=CASES.keys())
def test_the_input_carried_back_peaks_inside_the_square(model_name, size, box, colour, background) -> None:
    cfg = create_model(model_name).pretrained_cfg
    tensor, geometry = build_geometric_transform(cfg)(square_image(size, box, colour, background))
    brightness = tensor.mean(0)
    values, seen = to_image(brightness - brightness.min(), geometry)
    assert values.shape == seen.shape == (size[1], size[0])
    inside = torch.zeros_like(seen)
    inside[box[1]:box[3], box[0]:box[2]] = True
    assert values[inside].mean() > 4 * max(values[~inside].mean().item(), 1e-6)
    peak_row, peak_col = divmod(int(values.argmax()), size[0])
    assert inside[peak_row, peak_col]


def test_what_the_centre_crop_left_out_is_unseen() -> None:
    cfg = create_model("halonet26t").pretrained_cfg  # 256 of a 269-pixel short side: the long side's ends go
    _, geometry = build_geometric_transform(cfg)(Image.new("RGB", (800, 400)))
    _, seen = to_image(torch.ones(256, 256), geometry)
    left, top, right, bottom = geometry.crop_box()
    assert not seen[:, :int(left)].any() and not seen[:, int(right) + 1:].any() and seen[200, 400]
    assert (right - left) / (bottom - top) == pytest.approx(1, abs=0.01)  # the square crop, in image pixels
    assert seen.float().mean().item() == pytest.approx((right - left) * (bottom - top) / (800 * 400), abs=0.01)


def test_the_geometry_follows_a_resized_copy() -> None:
    cfg = create_model("halonet_compact").pretrained_cfg
    _, geometry = build_geometric_transform(cfg)(square_image((400, 200), (100, 50, 150, 100), 255, 0))
    half = geometry.resized((200, 100))
    assert half.crop == pytest.approx(tuple(c / 2 for c in geometry.crop)) and half.placed == geometry.placed


def test_the_overlay_is_the_picture_at_its_size_with_the_map_where_the_square_is() -> None:
    cfg = create_model("halonet26t").pretrained_cfg
    picture = square_image((640, 360), (420, 140, 470, 190), 255, 0)
    tensor, geometry = build_geometric_transform(cfg)(picture)
    brightness = tensor.mean(0)
    thumbnail = picture.resize((320, 180))
    png = overlay_png(brightness - brightness.min(), SourceImage(geometry, thumbnail))
    overlay = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    assert overlay.shape == (180, 320, 3) and len(png) < 60_000
    # Where the model saw nothing but black, the map is 0 and the picture shows through; at the
    # square the heat colours are laid over white; the cropped-away sides are hatched grey.
    assert overlay[90, 120].sum() < 30 and overlay[82, 222].sum() > 400
    hatched = overlay[:150, :25]
    assert (abs(hatched - 200) <= 4).all(-1).any() and hatched.max() <= 204  # 200, within the palette's rounding


def test_a_framed_image_maps_back_pixel_for_pixel() -> None:
    """A 28 x 28 image sits unchanged inside the compact model's 2-pixel border: carried back, the
    input is the image itself, exactly (a shift of one pixel would not be)."""
    cfg = create_model("halonet_compact").pretrained_cfg
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    tensor, geometry = build_geometric_transform(cfg)(Image.fromarray(pixels))
    values, seen = to_image(tensor[0] * cfg.std[0] + cfg.mean[0], geometry)
    assert seen.all()
    np.testing.assert_allclose(values.numpy() * 255, pixels, atol=1e-3)
