"""Decoded image -> tensor, as each model's pretrained config says (the same as timm's eval
transform). Every PIL mode is converted explicitly: transparent images are composited over white
(a transparent PNG's hidden pixels are not what its viewer sees), and 16-bit or float images are
scaled to 8 bits rather than clipped. Decoding itself: model/decoding.py.
"""
import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from . import fashion_mnist
from .decoding import ImageSource, load_image
from .geometry import InputGeometry
from .halonet import PretrainedConfig

# A transform that also says where the input's pixels come from in the image (model/geometry.py).
GeometricTransform = Callable[[Image.Image], Tuple[Tensor, InputGeometry]]

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}
PIL_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST}
# Resized, an image's longer side may be this many times the crop's before only the part the crop
# keeps is computed (see _resize_for_crop): panoramas up to about 7.5:1 resize exactly as timm does.
MAX_ELONGATION = 8


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float single-channel modes (I;16, I, F) scaled into 0..255."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        array = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    elif image.mode == "F":
        # The range (0..1 or 0..255) is read from the finite values; NaN (no data) is black, infinities
        # are the ends of the range.
        if array[np.isfinite(array)].max(initial=0) <= 1.0:
            array = array * 255.0
        array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


@functools.lru_cache(maxsize=None)
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    """CIELAB (TIFFs from Photoshop) to sRGB: Pillow's convert() has no such conversion, colour management does."""
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to RGB (channels=3) or L (channels=1), alpha composited over white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "LAB":
        image = ImageCms.applyTransform(image, _lab_to_srgb())
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def resize_size(cfg: PretrainedConfig) -> int:
    """Shorter side before the center crop: the input size divided by crop_pct, rounded down (timm's rule)."""
    return math.floor(cfg.input_size[1] / cfg.crop_pct)


def eval_transform(cfg: PretrainedConfig) -> GeometricTransform:
    """PIL image (any mode) -> normalized (C, H, W) float tensor: resize shorter side, center crop;
    and the crop's box in the image."""
    short, resample = resize_size(cfg), PIL_RESAMPLING[cfg.interpolation]
    resize = v2.Resize(short, interpolation=INTERPOLATIONS[cfg.interpolation], antialias=True)
    crop_h, crop_w = cfg.input_size[1:]
    crop = v2.CenterCrop((crop_h, crop_w))
    mean, std = list(cfg.mean), list(cfg.std)

    def transform(image: Image.Image) -> Tuple[Tensor, InputGeometry]:
        image = to_mode(image, cfg.input_size[0])
        band = _resize_for_crop(image, short, cfg.input_size[1:], resample)
        tensor = TF.normalize(TF.to_tensor(crop(resize(image) if band is None else band)), mean, std)
        return tensor, _center_crop_geometry(image.size, short, (crop_h, crop_w))

    return transform


def _center_crop_geometry(size: Tuple[int, int], short: int, crop: Tuple[int, int]) -> InputGeometry:
    """The box of an image of ``size`` that resizing its shorter side to ``short`` and then a centre
    crop keep, with torchvision's rounding of both."""
    width, height = size
    if width <= height:
        resized = (short, int(short * height / width))
    else:
        resized = (int(short * width / height), short)
    left, top = int(round((resized[0] - crop[1]) / 2.0)), int(round((resized[1] - crop[0]) / 2.0))
    sx, sy = width / resized[0], height / resized[1]
    return InputGeometry((width, height), (left * sx, top * sy, (left + crop[1]) * sx, (top + crop[0]) * sy),
                         (0.0, 0.0, float(crop[1]), float(crop[0])))


def _resize_for_crop(image: Image.Image, short: int, crop: Tuple[int, int],
                     resample: Image.Resampling) -> Optional[Image.Image]:
    """For an image so elongated that resizing its shorter side to ``short`` would make its longer
    side over MAX_ELONGATION times the crop's (a 1x5000 PNG of a few kB would become 269x1,345,000
    pixels, 1 GB): the central band of that resize which the center crop keeps, and only it.
    Pillow's resize of a box of the source weighs the same source pixels as the whole resize, so the
    band differs from the whole's only by rounding (a few levels of 255 in some pixels). None for
    other images, resized whole."""
    width, height = image.size
    tall = width <= height  # torchvision's rule for which side is the shorter
    long_side = int(short * max(width, height) / min(width, height))
    crop_long = crop[0] if tall else crop[1]
    if long_side <= MAX_ELONGATION * crop_long:
        return None
    scale = max(width, height) / long_side
    start = round((long_side - crop_long) / 2)  # where the center crop starts, as torchvision rounds
    band = (start * scale, (start + crop_long) * scale)
    if tall:
        return image.resize((short, crop_long), resample, box=(0, band[0], width, band[1]))
    return image.resize((crop_long, short), resample, box=(band[0], 0, band[1], height))


def fit_grayscale_transform(cfg: PretrainedConfig) -> GeometricTransform:
    """For models trained on Fashion-MNIST-like data: light objects centred on black, filling a 28x28
    frame inside a 2-pixel black border. Any photo becomes that: grayscale; inverted when its border
    is light (a dark object on a light background); cropped to the object and fitted into 28x28 with
    its aspect ratio kept, centred on black. A 28x28 image is taken as already framed and passes
    through unchanged, so a Fashion-MNIST image saved as PNG gives exactly the tensor the model was
    trained on. The geometry: the object's box, and where it lies in the input."""
    side, pad = _frame_side(cfg), fashion_mnist.PAD

    def transform(image: Image.Image) -> Tuple[Tensor, InputGeometry]:
        gray = to_mode(image, 1)
        if _border(np.asarray(gray)).mean() > 127:
            gray = ImageOps.invert(gray)
        box, placed = (0, 0, side, side), (0, 0, side, side)
        if gray.size != (side, side):
            box = _object_box(gray)
            gray = gray.crop(box)
            scale = side / max(gray.size)
            size = (max(1, round(gray.size[0] * scale)), max(1, round(gray.size[1] * scale)))
            canvas = Image.new("L", (side, side), 0)
            at = ((side - size[0]) // 2, (side - size[1]) // 2)
            canvas.paste(gray.resize(size, Image.Resampling.BILINEAR), at)
            gray, placed = canvas, (at[0], at[1], at[0] + size[0], at[1] + size[1])
        pixels = torch.from_numpy(np.array(gray, dtype=np.uint8))[None]
        geometry = InputGeometry(image.size, tuple(map(float, box)), tuple(float(c + pad) for c in placed))
        return fashion_mnist.to_model_input(pixels, cfg.mean[0], cfg.std[0])[0], geometry

    return transform


def _frame_side(cfg: PretrainedConfig) -> int:
    """The side of the frame fit_grayscale fits objects into, inside the model input's black border."""
    return cfg.input_size[1] - 2 * fashion_mnist.PAD


def _border(pixels: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of a (H, W) image, flat: what its background looks like."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def _object_box(gray: Image.Image) -> Tuple[int, int, int, int]:
    """The box of pixels clearly brighter than the border of a light-on-dark image (the whole image
    when nothing stands out)."""
    pixels = np.asarray(gray, dtype=np.float32)
    background = float(np.median(_border(pixels)))
    foreground = pixels > background + 0.2 * (pixels.max() - background)
    if pixels.max() - background < 16 or not foreground.any():
        return 0, 0, gray.width, gray.height
    rows, cols = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


TRANSFORMS = {"center_crop": eval_transform, "fit_grayscale": fit_grayscale_transform}


def build_geometric_transform(cfg: PretrainedConfig) -> GeometricTransform:
    """The transform a model's config names, with the geometry of what it kept (model/geometry.py)."""
    return TRANSFORMS[cfg.preprocess](cfg)


def describe_preprocessing(cfg: PretrainedConfig) -> str:
    """What the transform the config names does to an uploaded image, in a sentence for people."""
    channels, height, width = cfg.input_size
    if cfg.preprocess == "fit_grayscale":
        side = _frame_side(cfg)
        return (f"made grayscale (inverted when its border is light), cropped to the object that stands out from "
                f"the background, and fitted, aspect kept, into {side}x{side} pixels inside a "
                f"{fashion_mnist.PAD}-pixel black border ({width}x{height} in all)")
    colour = "colour" if channels == 3 else "grayscale"
    return (f"resized so that its shorter side is {resize_size(cfg)} pixels ({cfg.interpolation}), then its centre "
            f"cropped to {width}x{height} ({colour}); the rest of the image is not seen")


def build_transform(cfg: PretrainedConfig) -> Callable[[Image.Image], Tensor]:
    """The transform a model's config names: PIL image (any mode) -> normalized (C, H, W) tensor."""
    transform = build_geometric_transform(cfg)
    return lambda image: transform(image)[0]


def decode_min_side(cfg: PretrainedConfig) -> int:
    """The shortest side a decoded image needs for the transform the config names: ``load_image``'s
    ``min_side``. For center_crop, the side the image is resized to. fit_grayscale crops to the object
    before fitting it into its frame: 8 times the frame, so that an object an eighth of the image across
    is still shrunk into the frame, not enlarged (JPEGs decode at 1/8 scale at most anyway)."""
    if cfg.preprocess == "center_crop":
        return resize_size(cfg)
    return 8 * _frame_side(cfg)


def preprocess(images: Sequence[ImageSource], cfg: PretrainedConfig) -> Tensor:
    """Decode and transform images into one (B, C, H, W) batch, as the model's config says."""
    transform = build_transform(cfg)
    return torch.stack([transform(load_image(image)) for image in images])


__all__: List[str] = ["to_mode", "eval_transform", "fit_grayscale_transform", "build_transform",
                      "build_geometric_transform", "preprocess", "resize_size", "decode_min_side"]
