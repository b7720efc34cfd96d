"""Locust users for the HaloNet service: a realistic mix, and every answer checked, not just its status.

Mix (by task weight): single images of varied sizes and formats (70%), requests of 2-4 images
(20%), single images with heatmaps (10%). Run: ``make loadtest`` or
``locust -f tests/load/locustfile.py --host http://localhost:8000``.
"""
import io
import random
from typing import List, Tuple

import numpy as np
from locust import HttpUser, between, task
from PIL import Image, ImageDraw

FORMATS = [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
SIZES = [(28, 28), (64, 96), (240, 320), (600, 400)]


def make_images(count: int = 24, seed: int = 0) -> List[Tuple[str, bytes, str]]:
    """Garment-like shapes on light or dark backgrounds, in several sizes and formats."""
    rng = random.Random(seed)
    images = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        light = rng.random() < 0.7
        image = Image.new("RGB", (width, height), (245, 245, 240) if light else (10, 10, 10))
        draw = ImageDraw.Draw(image)
        color = tuple(rng.randrange(20, 120) if light else rng.randrange(150, 255) for _ in range(3))
        box = (width * rng.uniform(0.1, 0.3), height * rng.uniform(0.05, 0.2),
               width * rng.uniform(0.7, 0.9), height * rng.uniform(0.8, 0.95))
        (draw.rectangle if i % 2 else draw.ellipse)(box, fill=color)
        noise = np.asarray(image, dtype=np.int16) + np.random.default_rng(i).integers(-8, 9, (height, width, 3))
        image = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
        fmt, mime = FORMATS[i % len(FORMATS)]
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        images.append((f"img{i}.{fmt.lower()}", buffer.getvalue(), mime))
    return images


class HaloUser(HttpUser):
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.images = make_images(seed=random.randrange(1 << 30))
        info = self.client.get("/v1/model", name="/v1/model").json()
        self.classes = set(info["classes"])

    def _check(self, response, count: int, top_k: int, heatmaps: bool) -> None:
        if response.status_code != 200:
            response.failure(f"status {response.status_code}: {response.text[:200]}")
            return
        results = response.json().get("results", [])
        if len(results) != count:
            response.failure(f"{len(results)} results for {count} images")
            return
        for result in results:
            scores = [p["score"] for p in result["predictions"]]
            if len(scores) != top_k or scores != sorted(scores, reverse=True):
                response.failure(f"predictions not {top_k} sorted scores: {scores}")
                return
            if not {p["label"] for p in result["predictions"]} <= self.classes:
                response.failure("a label outside the model's classes")
                return
            if heatmaps:
                grids = result.get("heatmaps", {}).get("block_maps") or []
                if not grids or abs(sum(map(sum, grids[0])) - 1) > 1e-3:
                    response.failure("heatmaps missing or a block map not summing to 1")
                    return
        response.success()

    def _predict(self, count: int, top_k: int, heatmaps: bool, name: str) -> None:
        files = [("file", image) for image in random.sample(self.images, count)]
        query = f"?top_k={top_k}" + ("&heatmaps=true" if heatmaps else "")
        with self.client.post(f"/predict{query}", files=files, name=name, catch_response=True) as response:
            self._check(response, count, top_k, heatmaps)

    @task(7)
    def single_image(self) -> None:
        self._predict(1, 5, False, "/predict (1 image)")

    @task(2)
    def several_images(self) -> None:
        self._predict(random.randint(2, 4), 3, False, "/predict (2-4 images)")

    @task(1)
    def with_heatmaps(self) -> None:
        self._predict(1, 3, True, "/predict (heatmaps)")
