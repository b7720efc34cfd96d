"""The demo page at / in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
against a real server with the shipped model: what the page says about the model, a photo and a
Fashion-MNIST item classified as /predict classifies them, the overlay on the photo's own aspect
ratio, an oversized file's 413 message beside the others' answers, a drop, the keyboard, and no
console error (a Content-Security-Policy violation is one).

Screenshots go to $DEMO_SCREENSHOTS_DIR when it is set (``make screenshots``: docs/images/), else
to the test's temporary folder."""
import base64
import os
import shutil
from pathlib import Path
from typing import Iterator, List

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from model import fashion_mnist

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; "
                                                          ".ci/run does it)"),
              pytest.mark.skipif(not fashion_mnist.is_available(), reason="needs Fashion-MNIST "
                                                                          "(dataset-fashion-mnist)")]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"]
MAX_BODY_BYTES = 2_000_000  # the server's limit here, so that an oversized file stays small
TIMEOUT_MS = 60_000  # a result's wait on this slow 2-core machine; it takes well under a second alone


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    from benchmarks.server import ServerProcess  # the same runner as every other real-server test
    process = ServerProcess({"HALO_THREADS": "1", "HALO_MAX_BODY_BYTES": str(MAX_BODY_BYTES)})
    try:
        process.wait_ready()
        yield process.url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A photo (a cat, 902 x 600, larger than the overlay's 512-pixel cap), a Fashion-MNIST test item
    as PNG, and a file over the body limit."""
    folder = tmp_path_factory.mktemp("uploads")
    photo = Image.fromarray(skimage.data.chelsea())
    photo.resize((photo.width * 2, photo.height * 2), Image.Resampling.LANCZOS).save(folder / "cat.jpg", quality=90)
    images, _ = fashion_mnist.load_split("test")
    Image.fromarray(images[0].numpy()).save(folder / "ankle-boot.png")
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "too-large.png")  # about 2.4 MB: noise does not compress
    assert (folder / "too-large.png").stat().st_size > MAX_BODY_BYTES
    return {name: folder / f"{name}.{ext}" for name, ext in (("cat", "jpg"), ("ankle-boot", "png"),
                                                             ("too-large", "png"))}


@pytest.fixture
def page(server: str, tmp_path: Path) -> Iterator:
    """The demo page open in a fresh Chromium profile; fails the test on any console error."""
    errors: List[str] = []
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server + "/")
            page.locator("#classify:enabled").wait_for()  # the model's description has arrived
            yield page
        finally:
            context.close()
    # The oversized upload's 413 is logged by Chromium as a failed resource: the page shows it itself.
    assert [e for e in errors if "status of 413" not in e] == []


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("DEMO_SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / name, full_page=True)
    assert (folder / name).stat().st_size > 10_000


def predict_labels(server: str, path: Path, top_k: int) -> List[str]:
    response = httpx.post(f"{server}/predict", params={"top_k": top_k}, files={"file": (path.name, path.read_bytes())},
                          timeout=60)
    response.raise_for_status()
    return [p["label"] for p in response.json()["results"][0]["predictions"]]


def card(page, file_name: str):
    return page.locator("article.result").filter(has=page.locator("h3", has_text=file_name))


def labels_on(result) -> List[str]:
    return result.locator(".prediction .label").all_inner_texts()


def loaded_size(image) -> List[int]:
    image.wait_for()
    return image.evaluate("img => img.complete ? [img.naturalWidth, img.naturalHeight] : [0, 0]")


def classify(page, *paths: Path) -> None:
    page.set_input_files("#files", [str(p) for p in paths])
    page.click("#classify")
    page.locator("article.result:is(.answered, .failed)").nth(len(paths) - 1).wait_for()


def test_the_page_says_what_the_model_knows(page) -> None:
    assert "Fashion-MNIST" in page.inner_text("#model-trained-on")
    assert page.locator("#model-classes li").all_inner_texts()[:2] == ["T-shirt/top", "Trouser"]
    assert page.locator("#model-classes li").count() == 10
    assert "grayscale" in page.inner_text("#model-preprocessing")
    assert "a cat" in page.inner_text("#model-caveat")
    assert page.locator("#heatmap-layer").input_value() == "stages.1.1.self_attn"


def test_a_photo_is_classified_as_predict_classifies_it_with_its_overlay_on_its_own_shape(
        page, server: str, files: dict, tmp_path: Path) -> None:
    classify(page, files["cat"])
    result = card(page, "cat.jpg")
    assert labels_on(result) == predict_labels(server, files["cat"], 3)
    width, height = loaded_size(result.locator(".overlay img"))
    assert max(width, height) == 512 and width / height == pytest.approx(902 / 600, abs=0.01)
    assert loaded_size(result.locator(".mosaic img"))[0] > 0
    assert "stages.1.1.self_attn" in result.locator(".overlay img").get_attribute("alt")
    assert "batch of" in result.locator(".timing").inner_text()
    screenshot(page, "demo-photo.png", tmp_path)


def test_a_fashion_mnist_item_is_classified_as_predict_classifies_it(page, server: str, files: dict,
                                                                    tmp_path: Path) -> None:
    page.fill("#top-k", "5")
    classify(page, files["ankle-boot"])
    result = card(page, "ankle-boot.png")
    assert labels_on(result) == predict_labels(server, files["ankle-boot"], 5)
    assert labels_on(result)[0] == "Ankle boot"  # the test set's first item, which the model gets right
    assert loaded_size(result.locator(".overlay img")) == [28, 28]  # its own size, shown enlarged
    assert result.locator(".overlay img").evaluate("img => img.getBoundingClientRect().width") >= 196
    screenshot(page, "demo-fashion-mnist.png", tmp_path)


def test_an_oversized_file_shows_the_413_message_and_the_others_are_answered(page, files: dict) -> None:
    classify(page, files["too-large"], files["cat"], files["ankle-boot"])
    error = card(page, "too-large.png").locator(".error")
    assert error.is_visible()
    assert error.inner_text().startswith("413 body_too_large: ") and f"limit of {MAX_BODY_BYTES}" in error.inner_text()
    assert card(page, "cat.jpg").locator(".prediction").count() == 3
    assert labels_on(card(page, "ankle-boot.png"))[0] == "Ankle boot"
    assert "2 images classified, 1 refused" in page.inner_text("#form-status")


def test_a_dropped_file_is_classified_at_once(page, files: dict) -> None:
    data = base64.b64encode(files["ankle-boot"].read_bytes()).decode()
    dropped = page.evaluate_handle("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        return transfer;
    }""", data)
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
    page.locator("article.result.answered").wait_for()
    assert labels_on(card(page, "dropped.png"))[0] == "Ankle boot"


def test_the_form_works_from_the_keyboard_and_every_control_has_a_label(page, files: dict) -> None:
    for label in ("Image files", "Classes to show", "Heatmap layer", "Attention heatmaps"):
        assert page.get_by_label(label).count() == 1
    page.set_input_files("#files", [str(files["ankle-boot"])])
    page.focus("#files")
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id"))
    assert order == ["top-k", "heatmap-layer", "heatmaps", "classify"]
    page.keyboard.press("Enter")
    page.locator("article.result.answered").wait_for()
    image = card(page, "ankle-boot.png").locator(".overlay img")
    assert "ankle-boot.png" in image.get_attribute("alt")
