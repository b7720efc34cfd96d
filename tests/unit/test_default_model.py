"""The shipped default model: its accuracy on Fashion-MNIST, through tensors and through PNG files
and the public preprocessing, and the preprocessing that turns photos into its inputs."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model, fashion_mnist
from model.evaluate import load_shipped, load_test_inputs
from model.halonet import shipped_weights
from model.train import evaluate
from model.transforms import build_transform

needs_dataset = pytest.mark.skipif(
    not fashion_mnist.is_available(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist; .ci/run does it)")
SUBSET = 2000  # the first 2,000 test images; the model card has the full 10,000-image figure


def test_weights_are_shipped_small_and_load() -> None:
    path = shipped_weights("halonet_compact")
    assert path.is_file() and path.stat().st_size <= 10 * 2 ** 20
    model = load_shipped()
    assert model.pretrained_cfg.label_set == "fashion_mnist"


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@needs_dataset
def test_accuracy_on_the_test_set(shipped) -> None:
    accuracy, _ = evaluate(shipped, *load_test_inputs(shipped, limit=SUBSET))
    assert accuracy >= 0.925


@needs_dataset
def test_png_files_through_the_public_preprocessing_give_the_same_accuracy(shipped) -> None:
    tensors, labels = load_test_inputs(shipped, limit=SUBSET)
    from_png, png_labels = load_test_inputs(shipped, limit=SUBSET, via_png=True)
    assert torch.equal(labels, png_labels)
    assert torch.equal(from_png, tensors)  # exactly what the model saw in training
    direct, _ = evaluate(shipped, tensors, labels)
    via_png, _ = evaluate(shipped, from_png, labels)
    assert abs(direct - via_png) <= 0.002


def _photo_like(background: int, foreground: int, size: tuple) -> Image.Image:
    """A filled rectangle (the "garment") on a uniform background, in colour."""
    image = Image.new("RGB", size, (background,) * 3)
    w, h = size
    image.paste((foreground,) * 3, (w // 4, h // 8, 3 * w // 4, 7 * h // 8))
    return image


def test_dark_object_on_light_background_is_inverted_and_fitted() -> None:
    cfg = create_model("halonet_compact").pretrained_cfg
    tensor = build_transform(cfg)(_photo_like(background=240, foreground=30, size=(300, 600)))
    pixels = tensor[0] * cfg.std[0] + cfg.mean[0]  # back to 0..1
    assert tensor.shape == (1, 32, 32)
    assert pixels[0, 0] < 0.05 and pixels[16, 16] > 0.8  # black border and background, light object
    # A tall photo fills the height of the 28x28 frame and is centred horizontally.
    columns = (pixels > 0.5).any(0).nonzero().flatten()
    assert 12 <= columns.float().mean() <= 19


def test_a_small_object_in_a_large_photo_is_cropped_to_fill_the_frame() -> None:
    cfg = create_model("halonet_compact").pretrained_cfg
    photo = Image.new("RGB", (800, 600), (250, 250, 250))
    photo.paste((20, 20, 20), (380, 250, 420, 330))  # 40x80 object in a corner of nothing
    pixels = build_transform(cfg)(photo)[0] * cfg.std[0] + cfg.mean[0]
    rows = (pixels > 0.5).any(1).nonzero().flatten()
    assert rows.min() == 2 and rows.max() == 29  # the object spans the 28 rows inside the border


def test_light_object_on_dark_background_is_not_inverted() -> None:
    cfg = create_model("halonet_compact").pretrained_cfg
    pixels = build_transform(cfg)(_photo_like(background=10, foreground=220, size=(28, 28)))[0]
    assert pixels[16, 16] > pixels[3, 3]


def test_a_fashion_mnist_sized_png_passes_through_unchanged() -> None:
    cfg = create_model("halonet_compact").pretrained_cfg
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    image[0, :] = image[-1, :] = image[:, 0] = image[:, -1] = 0  # dark border, as in the dataset
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    expected = fashion_mnist.to_model_input(torch.from_numpy(image)[None], cfg.mean[0], cfg.std[0])[0]
    assert torch.equal(build_transform(cfg)(Image.open(buffer)), expected)
