"""Accuracy of the shipped default model on the Fashion-MNIST test set (``make evaluate``).

Two paths: the tensors exactly as training feeds them, and (``--via-png``) every test image
saved as a PNG file and read back through the public preprocessing, as the service would see
an upload. Writes the confusion matrix as a picture next to the weights.

    python -m model.evaluate [--weights PATH] [--via-png] [--limit N] [--confusion PNG]
"""
import argparse
import io
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw
from torch import Tensor

from . import fashion_mnist
from .halonet import WEIGHTS_DIR, HaloNet, create_model, load_labels, shipped_weights
from .train import MODEL_NAME, evaluate
from .transforms import preprocess


def load_shipped(weights: Optional[Path] = None) -> HaloNet:
    return create_model(MODEL_NAME, checkpoint=weights or shipped_weights(MODEL_NAME)).eval()


def load_test_inputs(model: HaloNet, limit: int = 0, via_png: bool = False) -> Tuple[Tensor, Tensor]:
    """Normalized test inputs and labels; via PNG files and the public preprocessing when asked."""
    images, labels = fashion_mnist.load_split("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    cfg = model.pretrained_cfg
    if not via_png:
        return fashion_mnist.to_model_input(images, cfg.mean[0], cfg.std[0]), labels
    files: List[bytes] = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.numpy(), mode="L").save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return preprocess(files, cfg), labels


def confusion_picture(confusion: Tensor, labels: List[str], accuracy: float) -> Image.Image:
    """The confusion matrix as a heat grid with counts, rows true classes, columns predictions."""
    n, cell, margin, top = len(labels), 44, 110, 40
    image = Image.new("RGB", (margin + n * cell + 10, top + margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"Fashion-MNIST test set, {MODEL_NAME}: accuracy {accuracy:.2%} "
                        f"(rows: true class, columns: predicted)", fill="black")
    row_totals = confusion.sum(1).clamp(min=1)
    for i in range(n):
        draw.text((5, top + margin + i * cell + cell // 3), labels[i][:16], fill="black")
        draw.text((margin + i * cell + 2, top + margin - 20 - (i % 2) * 14), labels[i][:9], fill="black")
        for j in range(n):
            share = confusion[i, j].item() / row_totals[i].item()
            shade = int(255 * (1 - share))
            x, y = margin + j * cell, top + margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline="gray")
            draw.text((x + 6, y + cell // 3), str(confusion[i, j].item()), fill="white" if share > 0.5 else "black")
    return image


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="default: the shipped weights")
    parser.add_argument("--via-png", action="store_true", help="through PNG files and the public preprocessing")
    parser.add_argument("--limit", type=int, default=0, help="first N test images only (0 = all 10,000)")
    parser.add_argument("--confusion", type=Path, help="where to write the confusion matrix picture "
                        "(default: next to the shipped weights, except with --via-png)")
    args = parser.parse_args(argv)
    model = load_shipped(args.weights)
    inputs, labels = load_test_inputs(model, args.limit, args.via_png)
    accuracy, confusion = evaluate(model, inputs, labels)
    print(f"{MODEL_NAME} test accuracy {accuracy:.4f} on {len(labels)} images"
          f"{' (via PNG files and the public preprocessing)' if args.via_png else ''}")
    picture = args.confusion or (None if args.via_png else WEIGHTS_DIR / "confusion_matrix.png")
    if picture:
        confusion_picture(confusion, load_labels(model.pretrained_cfg.label_set), accuracy).save(picture)
        print(f"confusion matrix: {picture}")


if __name__ == "__main__":
    main()
