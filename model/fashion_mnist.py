"""The Fashion-MNIST dataset as shipped by Debian's ``dataset-fashion-mnist`` (idx files, gzip).

Images are returned as they are stored, uint8 (N, 28, 28), light clothing on black; labels as
int64 (N,). ``to_model_input`` turns them into what the compact model reads.
"""
import gzip
import os
import struct
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_DIR = Path(os.environ.get("HALO_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
PAD = 2  # 28 + 2 * 2 = 32, the compact model's input side


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not installed."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def is_available(directory: Path = DEFAULT_DIR) -> bool:
    return all((directory / name).is_file() for names in FILES.values() for name in names)


def load_split(split: str, directory: Path = DEFAULT_DIR) -> Tuple[Tensor, Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the "train" or "test" split."""
    if not is_available(directory):
        raise DatasetMissingError(
            f"Fashion-MNIST is not in {directory}: install the Debian package dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or set HALO_FASHION_MNIST_DIR")
    images_file, labels_file = FILES[split]
    images = torch.from_numpy(_read_idx(directory / images_file).copy())
    labels = torch.from_numpy(_read_idx(directory / labels_file).astype(np.int64))
    return images, labels


def to_model_input(images: Tensor, mean: float, std: float) -> Tensor:
    """uint8 (N, 28, 28) -> normalized float (N, 1, 32, 32): a 2-pixel black border, then (x - mean) / std."""
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    return ((padded.float() / 255.0 - mean) / std).unsqueeze(1)
