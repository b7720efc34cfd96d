"""Preprocessing: timm's eval transform on real photographs, EXIF, every PIL mode, batches, the
decoding scale each transform needs. (Decoding itself: test_decoding.py.)"""
import io
import time
import warnings

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from model import create_model
from model.decoding import load_image
from model.transforms import build_transform, decode_min_side, preprocess, resize_size, to_mode

PHOTOS = {"astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee, "chelsea": skimage.data.chelsea}


@pytest.mark.parametrize("model_name", ["halonet26t", "sehalonet33ts"])  # crop_pct 0.95 and 0.94
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_matches_timm_eval_transform(model_name: str, photo: str) -> None:
    image = Image.fromarray(PHOTOS[photo]())
    timm_model = timm.create_model(model_name)
    expected = timm.data.create_transform(**timm.data.resolve_data_config({}, model=timm_model))(image)
    actual = build_transform(create_model(model_name).pretrained_cfg)(image)
    assert actual.shape == expected.shape == (3, 256, 256)
    assert (actual - expected).abs().max().item() <= 1e-3


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (20, 40)


def test_transparent_pixels_become_white_not_black() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgb = to_mode(load_image(_png(rgba)), 3)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (10, 20, 30)
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_mode(la, 1).getpixel((0, 0)) == 255


def test_palette_with_transparency() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    decoded = load_image(_png(palette, transparency=0))
    assert to_mode(decoded, 3).getpixel((0, 0)) == (255, 255, 255)
    assert to_mode(decoded, 3).getpixel((1, 0)) == (200, 100, 50)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert image.mode.startswith("I;16") or image.mode == "I"
    values = [to_mode(image, 1).getpixel((x, 0)) for x in range(3)]
    assert values == [0, 128, 255]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "PA", "CMYK", "YCbCr", "LAB", "RGB"])
def test_other_modes_convert(mode: str) -> None:
    image = Image.new(mode, (4, 4))
    assert to_mode(image, 3).mode == "RGB" and to_mode(image, 1).mode == "L"


def test_batch_of_mixed_sources(tmp_path) -> None:
    cfg = create_model("halonet26t").pretrained_cfg
    path = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(path)
    batch = preprocess([path, _png(Image.new("L", (50, 300))), Image.new("RGBA", (300, 50))], cfg)
    assert batch.shape == (3, 3, 256, 256) and batch.dtype == torch.float32


def test_decode_min_side_is_what_each_transform_needs() -> None:
    assert decode_min_side(create_model("halonet26t").pretrained_cfg) == 269  # its resize: 256 / 0.95
    assert decode_min_side(create_model("halonet_compact").pretrained_cfg) == 224  # 8 times its 28x28 frame


def test_cielab_becomes_srgb() -> None:
    lab = Image.new("LAB", (3, 1))
    for x, value in enumerate([(255, 128, 128), (0, 128, 128), (138, 209, 198)]):  # white, black, red
        lab.putpixel((x, 0), value)
    buffer = io.BytesIO()
    lab.save(buffer, format="TIFF")
    rgb = to_mode(load_image(buffer.getvalue()), 3)
    white, black, red = (np.array(rgb.getpixel((x, 0))) for x in range(3))
    assert white.min() >= 250 and black.max() <= 5 and red[0] >= 240 and red[1:].max() <= 15


def test_float_images_with_nan_and_infinities_scale_from_their_finite_values() -> None:
    values = np.array([[np.nan, 0.0, 0.5, 1.0, np.inf, -np.inf]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        gray = to_mode(Image.fromarray(values), 1)
    assert [gray.getpixel((x, 0)) for x in range(6)] == [0, 0, 128, 255, 255, 0]
    assert to_mode(Image.fromarray(np.full((2, 2), np.nan, np.float32)), 1).getextrema() == (0, 0)


def test_elongated_images_resize_only_the_band_the_crop_keeps() -> None:
    cfg = create_model("halonet26t").pretrained_cfg
    transform = build_transform(cfg)
    started = time.perf_counter()
    assert transform(Image.new("RGB", (1, 40_000))).shape == (3, 256, 256)  # not 269 x 10,760,000 pixels
    assert time.perf_counter() - started < 1.0
    resize = v2.Resize(resize_size(cfg), interpolation=InterpolationMode.BICUBIC, antialias=True)
    crop = v2.CenterCrop(cfg.input_size[1:])
    for size in [(20, 2000), (2000, 20), (64, 600)]:
        image = Image.fromarray(skimage.data.astronaut()).resize(size)
        whole = TF.normalize(TF.to_tensor(crop(resize(image))), list(cfg.mean), list(cfg.std))
        assert (transform(image) - whole).abs().max().item() < 0.1  # a few levels of 255 in some pixels


def test_fit_grayscale_reads_the_background_off_the_outermost_pixels() -> None:
    """A dark image in a light frame one pixel wide is a dark object on a light background: inverted,
    it fills the model's 28x28 frame, light on black."""
    cfg = create_model("halonet_compact").pretrained_cfg
    framed = ImageOps.expand(Image.new("L", (98, 98), 0), border=1, fill=255)
    pixels = build_transform(cfg)(framed)[0] * cfg.std[0] + cfg.mean[0]
    assert pixels[2:30, 2:30].min().item() > 0.99 and pixels[:2].max().item() < 0.01
