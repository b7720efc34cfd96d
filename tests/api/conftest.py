"""An app serving the compact model with random weights."""
import io
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app


def make_settings(checkpoint: Path, **overrides) -> Settings:
    return Settings(checkpoint=checkpoint, threads=1, max_batch_size=8, **overrides)


@pytest.fixture(scope="session")
def client(random_compact_checkpoint: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(random_compact_checkpoint, max_body_bytes=2_000_000, max_pixels=1_000_000))
    with TestClient(app) as test_client:
        assert app.state.service.wait_until_loaded(120), app.state.service.load_error
        yield test_client


def image_bytes(fmt: str = "PNG", size=(40, 60), mode: str = "RGB", color=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size, color if mode in ("RGB", "RGBA") else 128)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()
