"""Image -> tensor, as each model's pretrained config says (the same as timm's eval transform).

Decoding is strict and explicit: EXIF orientation is applied, transparent images are
composited over white (a transparent PNG's hidden pixels are not what its viewer sees), and
16-bit or float images are scaled to 8 bits rather than clipped.
"""
import io
import math
from pathlib import Path
from typing import Callable, Collection, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from . import fashion_mnist
from .halonet import PretrainedConfig

ImageSource = Union[bytes, str, Path, Image.Image]
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


class ImageDecodeError(ValueError):
    """Bytes that are not an image PIL can decode."""


class ImageTooLargeError(ValueError):
    """An image with more pixels than allowed (refused from its header, before decoding)."""


class UnsupportedImageFormatError(ValueError):
    """A decodable image in a format the caller does not accept."""


def load_image(source: ImageSource, max_pixels: Optional[int] = None,
               formats: Optional[Collection[str]] = None) -> Image.Image:
    """Open and fully decode an image (first frame of animations), upright per its EXIF orientation.

    ``max_pixels`` is checked on the header, before any pixel is decoded (decompression bombs);
    ``formats`` (PIL format names such as "PNG") restricts what is accepted.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"image refused before decoding: {e}") from e
        except UnidentifiedImageError as e:
            raise ImageDecodeError("cannot decode image: not an image file in a format PIL reads") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageDecodeError(f"cannot decode image: {e}") from e
        if formats is not None and image.format not in formats:
            raise UnsupportedImageFormatError(
                f"image format {image.format} is not accepted; send one of {', '.join(sorted(formats))}")
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLargeError(
                f"image of {image.width}x{image.height} pixels is over the limit of {max_pixels} pixels")
        try:
            image.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"image refused before decoding: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageDecodeError(f"cannot decode image: {e}") from e
    return ImageOps.exif_transpose(image)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float single-channel modes (I;16, I, F) scaled into 0..255."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        array = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    elif image.mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to RGB (channels=3) or L (channels=1), alpha composited over white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
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


def eval_transform(cfg: PretrainedConfig) -> Callable[[Image.Image], Tensor]:
    """PIL image (any mode) -> normalized (C, H, W) float tensor: resize shorter side, center crop."""
    resize = v2.Resize(resize_size(cfg), interpolation=INTERPOLATIONS[cfg.interpolation], antialias=True)
    crop = v2.CenterCrop(cfg.input_size[1:])
    mean, std = list(cfg.mean), list(cfg.std)

    def transform(image: Image.Image) -> Tensor:
        image = crop(resize(to_mode(image, cfg.input_size[0])))
        return TF.normalize(TF.to_tensor(image), mean, std)

    return transform


def fit_grayscale_transform(cfg: PretrainedConfig) -> Callable[[Image.Image], Tensor]:
    """For models trained on Fashion-MNIST-like data: light objects centred on black, filling a 28x28
    frame inside a 2-pixel black border. Any photo becomes that: grayscale; inverted when its border
    is light (a dark object on a light background); cropped to the object and fitted into 28x28 with
    its aspect ratio kept, centred on black. A 28x28 image is taken as already framed and passes
    through unchanged, so a Fashion-MNIST image saved as PNG gives exactly the tensor the model was
    trained on."""
    side = cfg.input_size[1] - 2 * fashion_mnist.PAD

    def transform(image: Image.Image) -> Tensor:
        gray = to_mode(image, 1)
        pixels = np.asarray(gray)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        if border.mean() > 127:
            gray = ImageOps.invert(gray)
        if gray.size != (side, side):
            gray = _crop_to_object(gray)
            scale = side / max(gray.size)
            size = (max(1, round(gray.size[0] * scale)), max(1, round(gray.size[1] * scale)))
            canvas = Image.new("L", (side, side), 0)
            canvas.paste(gray.resize(size, Image.Resampling.BILINEAR), ((side - size[0]) // 2, (side - size[1]) // 2))
            gray = canvas
        pixels = torch.from_numpy(np.array(gray, dtype=np.uint8))[None]
        return fashion_mnist.to_model_input(pixels, cfg.mean[0], cfg.std[0])[0]

    return transform


def _crop_to_object(gray: Image.Image) -> Image.Image:
    """Crop a light-on-dark image to the box of pixels clearly brighter than its border (the whole
    image when nothing stands out)."""
    pixels = np.asarray(gray, dtype=np.float32)
    background = float(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))
    foreground = pixels > background + 0.2 * (pixels.max() - background)
    if pixels.max() - background < 16 or not foreground.any():
        return gray
    rows, cols = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
    return gray.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


TRANSFORMS = {"center_crop": eval_transform, "fit_grayscale": fit_grayscale_transform}


def build_transform(cfg: PretrainedConfig) -> Callable[[Image.Image], Tensor]:
    """The transform a model's config names: PIL image (any mode) -> normalized (C, H, W) tensor."""
    return TRANSFORMS[cfg.preprocess](cfg)


def preprocess(images: Sequence[ImageSource], cfg: PretrainedConfig) -> Tensor:
    """Decode and transform images into one (B, C, H, W) batch, as the model's config says."""
    transform = build_transform(cfg)
    return torch.stack([transform(load_image(image)) for image in images])


def preprocess_tensor(batch: Tensor, cfg: PretrainedConfig) -> Tensor:
    """``eval_transform`` on a uint8 (B, C, H, W) batch already in the model's channel count.

    Resizing runs on tensors (antialiased), so results differ from the PIL path by interpolation
    rounding (about 1e-2 after normalization), not by geometry.
    """
    if cfg.preprocess != "center_crop":
        raise ValueError(f"the tensor path implements the center_crop preprocessing, not {cfg.preprocess!r}")
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != cfg.input_size[0]:
        raise ValueError(f"expected a uint8 (B, {cfg.input_size[0]}, H, W) batch, got {batch.dtype} "
                         f"{tuple(batch.shape)}")
    batch = v2.functional.resize(batch, [resize_size(cfg)], INTERPOLATIONS[cfg.interpolation], antialias=True)
    batch = v2.functional.center_crop(batch, list(cfg.input_size[1:]))
    batch = batch.float().div_(255)
    return TF.normalize(batch, list(cfg.mean), list(cfg.std))


__all__: List[str] = ["ImageDecodeError", "ImageTooLargeError", "UnsupportedImageFormatError", "load_image", "to_mode",
                      "eval_transform", "fit_grayscale_transform", "build_transform", "preprocess", "preprocess_tensor",
                      "resize_size"]
