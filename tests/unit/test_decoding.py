"""Decoding (model/decoding.py): bad bytes, non-images named as what they are, bombs refused from
their header, files built to be costly to decode, reduced-scale JPEG decoding, first frames."""
import bz2
import gzip
import io
import re
import time
import zipfile

import numpy as np
import pytest
import skimage.data
from PIL import Image

from model.decoding import ImageDecodeError, ImageTooLargeError, UnsupportedImageFormatError, load_image, open_image
from tests.reliability.image_corpus import (after_soi, apng, encode, gif, gif_pixel, jpeg_segment, many_frame_webp,
                                            png, png_chunk, progressive_scan_bomb, striped_tiff)


def test_undecodable_bytes_are_a_clear_error() -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        load_image(np.random.default_rng(0).bytes(300))
    with pytest.raises(ImageDecodeError):
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        load_image(encode(noise, "PNG")[:500])  # a truncated PNG


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", encode(Image.new("RGB", (4, 4)), "PNG"))
    return buffer.getvalue()


@pytest.mark.parametrize("data,kind", [
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>', "an SVG drawing"),
    (b'\xef\xbb\xbf\n<?xml version="1.0"?>\n<!-- by hand -->\n<svg width="4" height="4"/>', "an SVG drawing"),
    (b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>", "an HTML page"),
    (b"<html><body>hello</body></html>" + bytes(range(256)), "an HTML page"),  # however binary what follows
    (b'<?xml version="1.0"?><note>hello</note>', "an XML document"),
    (_zip(), "a ZIP archive"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
    (b"%!PS-Adobe-3.0\n", "a PostScript document"),
    (gzip.compress(b"<svg/>", mtime=0), "gzip-compressed data"),
    (bz2.compress(b"text"), "bzip2-compressed data"),
    (b"\xfd7zXZ\x00\x00", "xz-compressed data"),
    (b"7z\xbc\xaf\x27\x1c\x00\x04", "a 7-Zip archive"),
    (b"Rar!\x1a\x07\x01\x00", "a RAR archive"),
    (b"\x7fELF\x02\x01\x01", "an ELF executable"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "a HEIF (HEIC) image"),
    (b"\x00\x00\x00\x18ftypavis\x00\x00\x00\x00avisavif", "an AVIF image"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", "an MP4 or QuickTime video"),
    (b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a\x00\x00", "a JPEG XL image"),
    (b"\xff\x0a\xfa\x7f\x01\x90", "a JPEG XL image"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "a WAV audio file"),
    (b"RIFF\x24\x00\x00\x00AVI LIST", "an AVI video"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "a Matroska or WebM video"),
    (b"OggS\x00\x02\x00\x00", "an Ogg audio or video file"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x00", "an MP3 audio file"),
    ("a cat, described in words rather than pixels: no 猫 here\n".encode(), "text"),
    (b'{"image": "cat.jpg"}', "text"),
    ("a cat in UTF-16".encode("utf-16"), "UTF-16 text"),
])
def test_what_is_recognisably_not_an_image_is_an_unsupported_format_named(data: bytes, kind: str) -> None:
    with pytest.raises(UnsupportedImageFormatError, match=re.escape(f"not an image: the bytes look like {kind}")):
        load_image(data, formats={"PNG"})


@pytest.mark.parametrize("data", [b"G", b"GIF8", b"B", b"RIFF", b"GIF89a, the format of this text", b"\xff\xd8\xff",
                                  b"not an image" + np.random.default_rng(1).bytes(200)])
def test_broken_images_and_noise_stay_undecodable_even_when_they_read_as_text(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        load_image(data)


def _png_of_size(width: int, height: int) -> bytes:
    return png(width, height, 1, 0, b"\0\0")


def test_a_huge_declared_size_is_refused_with_its_dimensions_and_the_callers_limit() -> None:
    bomb = _png_of_size(100_000, 100_000)  # Pillow's own check refuses it inside Image.open
    with pytest.raises(ImageTooLargeError, match=r"^image of 100000x100000 pixels is over the limit of 40000000 "):
        load_image(bomb, max_pixels=40_000_000)
    with pytest.raises(ImageTooLargeError, match=r"^image of 100000x100000 pixels is over the limit of 178956970 "):
        load_image(bomb, max_pixels=10 ** 12)  # capped at Pillow's, which also applies with no limit given
    with pytest.raises(ImageTooLargeError, match=r"^image of 100000x100000 pixels is over the limit of 178956970 "):
        load_image(bomb)
    with pytest.raises(ImageTooLargeError, match=r"^image of 2000x1000 pixels is over the limit of 1000000 "):
        load_image(_png_of_size(2000, 1000), max_pixels=1_000_000)  # one Pillow opens: our check refuses it


def test_open_image_reads_the_header_and_decodes_nothing() -> None:
    image = open_image(encode(Image.new("RGB", (40, 30)), "PNG"), max_pixels=1200, formats={"PNG"})
    assert (image.format, image.size, image.mode) == ("PNG", (40, 30), "RGB") and image.tile  # still to decode
    with pytest.raises(ImageTooLargeError):
        open_image(encode(Image.new("RGB", (40, 30)), "PNG"), max_pixels=1199)
    with pytest.raises(UnsupportedImageFormatError, match="image format PNG is not accepted; send one of JPEG"):
        open_image(encode(Image.new("RGB", (4, 4)), "PNG"), formats={"JPEG"})


def _jpeg(size, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize(size).save(buffer, format="JPEG", **params)
    return buffer.getvalue()


@pytest.mark.parametrize("size,min_side,decoded", [
    ((1000, 600), 100, (250, 150)),  # 1/4: 1/8 would make the shorter side 75
    ((2000, 1100), 269, (500, 275)),
    ((6000, 6000), 269, (750, 750)),  # 1/8, libjpeg's smallest scale
    ((1100, 538), 269, (550, 269)),  # exactly twice: 1/2
])
def test_a_large_jpeg_decodes_at_a_reduced_scale_but_never_under_min_side(size, min_side: int, decoded) -> None:
    assert load_image(_jpeg(size), min_side=min_side, max_pixels=40_000_000).size == decoded


@pytest.mark.parametrize("size", [(537, 800), (300, 200)])
def test_a_jpeg_under_twice_min_side_decodes_exactly_as_without_it(size) -> None:
    data = _jpeg(size)
    assert np.array_equal(np.asarray(load_image(data, min_side=269)), np.asarray(load_image(data)))


def test_min_side_leaves_other_formats_whole() -> None:
    assert load_image(encode(Image.new("RGB", (2000, 1000)), "PNG"), min_side=100).size == (2000, 1000)


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_before_decoding() -> None:
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="a JPEG of 5001 scans, more than the 100 decoded here"):
        load_image(progressive_scan_bomb(1000, 5000))  # libjpeg would take about a second
    assert time.perf_counter() - started < 0.5
    assert load_image(progressive_scan_bomb(64, 90)).size == (64, 64)
    assert load_image(_jpeg((64, 48), progressive=True)).size == (64, 48)


def test_a_jpeg_of_thousands_of_segments_is_refused() -> None:
    jpeg = _jpeg((16, 16))
    with pytest.raises(ImageDecodeError, match="more than 1000 segments before its first scan"):
        load_image(after_soi(jpeg, jpeg_segment(0xFE, b"") * 1001))
    with pytest.raises(ImageDecodeError, match="more than 1000 segments before its first scan"):
        load_image(after_soi(jpeg, b"\xff" * 5000))  # fill bytes, which Pillow reads one by one
    assert load_image(after_soi(jpeg, jpeg_segment(0xFE, b"a comment") * 990)).size == (16, 16)


def test_a_png_of_thousands_of_chunks_is_refused_but_not_a_long_animation() -> None:
    image = encode(Image.new("L", (4, 4)), "PNG")
    with pytest.raises(ImageDecodeError, match="a PNG of more than 20000 chunks"):
        load_image(image[:33] + png_chunk(b"tEXt", b"k\0v") * 20_001 + image[33:])
    assert load_image(apng(30_000)).size == (1, 1)  # Pillow reads no further than the second frame


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the broken headers below
def test_a_tiff_of_too_many_strips_is_refused() -> None:
    for byte_order, big in [("<", False), (">", False), ("<", True)]:  # and a BigTIFF
        with pytest.raises(ImageDecodeError, match="a TIFF of 50001 strips or tiles, more than the 50000 decoded"):
            load_image(striped_tiff(50_001, byte_order, big))
        assert load_image(striped_tiff(2000, byte_order, big)).getpixel((0, 1999)) == 1999 % 256
    past_the_end = [b"II*\0\xff\xff\xff\x7f", b"II+\0\x08\0\0\0" + b"\xff" * 8, b"MM\0*\0\0\0\x08\0"]
    for header in past_the_end:  # the first IFD's offset, or its entries, beyond the file
        with pytest.raises(ImageDecodeError):
            load_image(header)


@pytest.mark.parametrize("animation", [gif(16, 16, [gif_pixel(i % 16, i // 16 % 16) for i in range(5000)]),
                                       many_frame_webp(3000), apng(3000)], ids=["gif", "webp", "png"])
def test_only_the_first_frame_of_thousands_is_decoded(animation: bytes) -> None:
    started = time.perf_counter()
    image = load_image(animation)
    assert time.perf_counter() - started < 0.5 and image.tell() == 0 and image.n_frames >= 3000
