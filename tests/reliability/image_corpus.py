"""A corpus of hostile and unusual image files, each with the answers /predict may give it.

Everything is generated here, deterministically, from a few seed images drawn with numpy and encoded
with Pillow (nothing is downloaded): truncations and bit flips of every accepted format, wrong magic,
headers declaring huge or zero sizes, thousands of animation frames, odd pixel modes, EXIF and ICC
metadata valid and broken, floods of markers and chunks, and files that are not images at all.
Expected answers are the documented ones: "ok" (200) or "status code", such as "415
unsupported_image_format"; a bit flip may land anywhere, so it may get any answer but a 5xx.

    python -m tests.reliability.image_corpus OUTDIR   # the files and expected.tsv, for fuzzers' seeds
"""
import bz2
import gzip
import io
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageCms

OK = "ok"
EMPTY = "400 empty_image"
UNDECODABLE = "400 undecodable_image"
TOO_LARGE = "413 image_too_large"
UNSUPPORTED = "415 unsupported_image_format"
ANY_ANSWER = frozenset({OK, UNDECODABLE, TOO_LARGE, UNSUPPORTED})

SEED = 20240617
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp"}
ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    name: str  # a file name: what the case is, with the extension of what its bytes claim to be
    data: bytes
    expected: FrozenSet[str]  # the answers allowed


def case(name: str, data: bytes, *expected: str) -> Case:
    return Case(name, data, frozenset(expected))


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A gradient with noise: smooth enough for lossy codecs to treat like a photograph, noisy enough that
    most of each file is pixel data (so that cuts in its middle land there)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), np.full_like(x, 128.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int, color_type: int, scanlines: bytes, *chunks: bytes,
        interlace: int = 0) -> bytes:
    """A PNG from already filtered scanlines, with extra chunks between IHDR and IDAT."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace))
    return (b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + png_chunk(b"IDAT", zlib.compress(scanlines))
            + png_chunk(b"IEND", b""))


def adam7_png(pixels: np.ndarray) -> bytes:
    """An interlaced 8-bit RGB PNG (Pillow writes none): the seven Adam7 passes, each row unfiltered."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    scanlines = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in pixels[y0::dy, x0::dx]
                         if row.size)
    return png(pixels.shape[1], pixels.shape[0], 8, 2, scanlines, interlace=1)


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def after_soi(jpeg: bytes, segments: bytes) -> bytes:
    return jpeg[:2] + segments + jpeg[2:]


def _entropy_coded(bits: str) -> bytes:
    """Bits, padded with ones as JPEG pads, into bytes, each 0xFF byte stuffed with a zero."""
    bits += "1" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")


def progressive_scan_bomb(side: int, scans: int) -> bytes:
    """A grayscale progressive JPEG with ``scans`` AC scans of 12 bytes each, every one an end-of-band run
    over all of its blocks: libjpeg visits every block once per scan, so decoding costs scans x blocks."""
    blocks = ((side + 7) // 8) ** 2
    run_bits = blocks.bit_length() - 1  # a run of 2**r + extra blocks, r < 15
    tables = (b"\x00" + bytes([1] + [0] * 15) + b"\x00"  # DC: a single code, "difference 0"
              + b"\x10" + bytes([1] + [0] * 15) + bytes([run_bits << 4]))  # AC: a single code, "EOB run"
    header = (b"\xff\xd8" + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
              + jpeg_segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
              + jpeg_segment(0xC4, tables))
    dc_scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + _entropy_coded("0" * blocks)
    ac_scan = jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + _entropy_coded(
        "0" + format(blocks - (1 << run_bits), f"0{run_bits}b"))
    return header + dc_scan + ac_scan * scans + b"\xff\xd9"


def exif_bytes(**tags) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[int(tag[1:], 16)] = value  # keyword "x0112" is tag 0x0112
    return exif.tobytes()


def raw_exif(entries: Sequence[Tuple[int, int, int, bytes]], next_ifd: int = 0) -> bytes:
    """A little-endian EXIF block of one IFD at offset 8, of (tag, type, count, value of up to 4 bytes),
    written by hand to hold what Pillow's writer refuses: values of the wrong type, an IFD linking to itself."""
    fields = b"".join(struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
                      for tag, kind, count, value in entries)
    return b"II*\0\x08\0\0\0" + struct.pack("<H", len(entries)) + fields + struct.pack("<I", next_ifd)


def app1_exif(tiff: bytes) -> bytes:
    return jpeg_segment(0xE1, b"Exif\0\0" + tiff)


def tiff_with_size(width: int, height: int) -> bytes:
    """A little-endian TIFF header and one IFD declaring an 8-bit grayscale image of any size."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                     for tag, kind, value in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 16) + b"\0" * 8 + ifd


def striped_tiff(height: int, byte_order: str = "<", big: bool = False) -> bytes:
    """An uncompressed 1-pixel-wide grayscale TIFF (BigTIFF if ``big``) of one row per strip, as scanners
    write them; its pixels are a gradient."""
    offset, entry, count = ("Q", "HHQQ", "Q") if big else ("I", "HHII", "H")
    magic = (b"II" if byte_order == "<" else b"MM") + struct.pack(byte_order + ("HHH" if big else "H"),
                                                                   *((43, 8, 0) if big else (42,)))
    ifd_at = len(magic) + struct.calcsize(byte_order + offset)
    offsets_at = ifd_at + struct.calcsize(byte_order + count + entry * 9 + offset)
    counts_at = offsets_at + 4 * height
    pixels_at = counts_at + 4 * height
    entries = [(256, 4, 1, 1), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, height, offsets_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, height, counts_at)]
    # A value held in its entry starts at the first byte of the value field, whatever the byte order.
    fields = b"".join(struct.pack(byte_order + entry[:3], tag, kind, n)
                      + struct.pack(byte_order + ("H" if kind == 3 else "I"), value).ljust(8 if big else 4, b"\0")
                      for tag, kind, n, value in entries)
    ifd = struct.pack(byte_order + count, len(entries)) + fields + struct.pack(byte_order + offset, 0)
    return (magic + struct.pack(byte_order + offset, ifd_at) + ifd
            + np.arange(pixels_at, pixels_at + height, dtype=f"{byte_order}u4").tobytes()
            + np.ones(height, f"{byte_order}u4").tobytes() + (np.arange(height) % 256).astype(np.uint8).tobytes())


def gif(width: int, height: int, frames: Sequence[bytes]) -> bytes:
    """A GIF89a with a 4-colour palette and the given frames (image descriptors with their data)."""
    palette = bytes([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255])
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0x81, 0, 0) + palette + b"".join(frames) + b";"


def gif_pixel(x: int, y: int, width: int = 1, height: int = 1) -> bytes:
    """A frame at (x, y) declaring width x height pixels; its data is one pixel of colour 0, which is a
    whole 1x1 frame (larger frames end short, as a decoder has to tolerate)."""
    control = b"\x21\xf9\x04\x00\x02\x00\x00\x00"  # 20 ms per frame
    return control + b"\x2c" + struct.pack("<HHHHB", x, y, width, height, 0) + b"\x02\x02\x44\x01\x00"


def riff(kind: bytes, chunks: Sequence[bytes]) -> bytes:
    body = kind + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def riff_chunks(data: bytes) -> List[bytes]:
    """The chunks of a RIFF file (each with its header and padding)."""
    chunks, offset = [], 12
    while offset < len(data):
        size = struct.unpack("<I", data[offset + 4:offset + 8])[0]
        chunks.append(data[offset:offset + 8 + size + size % 2])
        offset += 8 + size + size % 2
    return chunks


def many_frame_webp(frames: int) -> bytes:
    """An animated WebP of ``frames`` frames: Pillow's two-frame file with its last frame, a flat one of a few
    bytes, repeated (encoding thousands of frames would take seconds)."""
    first, second = photo(16, 16, seed=1), Image.new("RGB", (16, 16), (200, 30, 30))
    chunks = riff_chunks(encode(first, "WEBP", save_all=True, append_images=[second], lossless=True))
    animation = [c for c in chunks if c[:4] == b"ANMF"]
    return riff(b"WEBP", [c for c in chunks if c[:4] != b"ANMF"] + animation + animation[-1:] * (frames - 2))


def apng(frames: int) -> bytes:
    """An animated 1x1 PNG of ``frames`` frames, the first being the IDAT image."""
    control = [png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", max(0, 2 * i - 1), 1, 1, 0, 0, 1, 50, 0, 0))
               for i in range(frames)]
    rest = b"".join(control[i] + png_chunk(b"fdAT", struct.pack(">I", 2 * i + 1) + zlib.compress(b"\0\x80"))
                    for i in range(1, frames))
    image = png(1, 1, 8, 0, b"\0\x80", png_chunk(b"acTL", struct.pack(">II", frames, 0)), control[0])
    return image[:-12] + rest + image[-12:]


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _seed_files() -> List[Case]:
    seed = photo()
    return [case(f"seed.{ext}", encode(seed, fmt), OK) for fmt, ext in FORMATS.items()]


# Cutting a file's last two bytes leaves every pixel of a PNG (the cut is in IEND's checksum) and of a GIF
# (in its trailer), which Pillow accepts, but not JPEG's end-of-image marker, which it requires; in the
# other formats the cut is in pixel data.
LAST_TWO_BYTES_CUT = {"jpg": UNDECODABLE, "png": OK, "gif": OK, "webp": UNDECODABLE, "tif": UNDECODABLE,
                      "bmp": UNDECODABLE}


def _truncations(seeds: Sequence[Case]) -> List[Case]:
    """Cuts in the header, then a quarter, half and three quarters in (pixel data), then of the last two bytes."""
    cases = []
    for seed in seeds:
        data = seed.data
        for cut in (1, 4, 12, 30, len(data) // 4, len(data) // 2, 3 * len(data) // 4):
            cases.append(case(f"truncated-{cut}-of-{seed.name}", data[:cut], UNDECODABLE))
        cases.append(case(f"truncated-last-2-bytes-of-{seed.name}", data[:-2],
                          LAST_TWO_BYTES_CUT[seed.name.rsplit(".", 1)[1]]))
    return cases


def _bit_flips(seeds: Sequence[Case]) -> List[Case]:
    rng = np.random.default_rng(SEED)
    cases = []
    for seed in seeds:
        for variant in range(6):
            data = bytearray(seed.data)
            for position in rng.integers(0, len(data), size=1 + variant):
                data[position] ^= 1 << int(rng.integers(0, 8))
            cases.append(case(f"bit-flips-{variant + 1}-in-{seed.name}", bytes(data), *ANY_ANSWER))
    return cases


def _wrong_magic() -> List[Case]:
    seed = photo()
    jpeg, png_file, webp = encode(seed, "JPEG"), encode(seed, "PNG"), encode(seed, "WEBP")
    return [
        case("png-bytes-behind-jpeg-magic.jpg", b"\xff\xd8\xff\xe0" + png_file[4:], UNDECODABLE),
        case("jpeg-bytes-behind-png-magic.png", b"\x89PNG\r\n\x1a\n" + jpeg[8:], UNDECODABLE),
        case("gif-with-unknown-version.gif", b"GIF00a" + encode(seed, "GIF")[6:], UNDECODABLE),
        case("bmp-with-swapped-magic.bmp", b"MB" + encode(seed, "BMP")[2:], UNDECODABLE),
        case("tiff-with-bigtiff-magic.tif", b"II+\0" + encode(seed, "TIFF")[4:], UNDECODABLE),
        case("png-with-zeroed-magic.png", b"\0" * 8 + png_file[8:], UNDECODABLE),
        case("webp-relabelled-wave.wav", webp[:8] + b"WAVE" + webp[12:], UNSUPPORTED),
    ]


def _declared_sizes() -> List[Case]:
    jpeg = bytearray(encode(Image.new("L", (8, 8)), "JPEG"))
    size_at = jpeg.find(b"\xff\xc0") + 5

    def jpeg_of(width: int, height: int) -> bytes:
        jpeg[size_at:size_at + 4] = struct.pack(">HH", height, width)
        return bytes(jpeg)

    def bmp_of(width: int, height: int) -> bytes:
        bmp = bytearray(encode(Image.new("RGB", (8, 8)), "BMP"))
        bmp[18:26] = struct.pack("<ii", width, height)
        return bytes(bmp)

    def webp_of(width: int, height: int) -> bytes:
        canvas = struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
        return riff(b"WEBP", [b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + canvas]
                    + riff_chunks(encode(photo(8, 8), "WEBP")))

    gray_rows = b"\0\0" * 8
    return [
        case("png-100000x100000.png", png(100_000, 100_000, 1, 0, gray_rows), TOO_LARGE),
        case("png-60000x60000.png", png(60_000, 60_000, 8, 2, gray_rows), TOO_LARGE),
        case("png-1x2147483647.png", png(1, 2 ** 31 - 1, 8, 0, gray_rows), TOO_LARGE),
        case("jpeg-60000x60000.jpg", jpeg_of(60_000, 60_000), TOO_LARGE),
        case("jpeg-65535x65535.jpg", jpeg_of(65_535, 65_535), TOO_LARGE),
        case("gif-60000x60000.gif", gif(60_000, 60_000, [gif_pixel(0, 0)]), TOO_LARGE),
        case("gif-frame-60000x60000-in-8x8.gif", gif(8, 8, [gif_pixel(0, 0, 60_000, 60_000)]), TOO_LARGE),
        case("bmp-100000x100000.bmp", bmp_of(100_000, 100_000), TOO_LARGE),
        case("bmp-top-down-100000x100000.bmp", bmp_of(100_000, -100_000), TOO_LARGE),
        case("tiff-100000x100000.tif", tiff_with_size(100_000, 100_000), TOO_LARGE),
        case("webp-canvas-16777216x16777216.webp", webp_of(2 ** 24, 2 ** 24), TOO_LARGE),
        case("webp-canvas-60000x60000.webp", webp_of(60_000, 60_000), TOO_LARGE),
        case("png-0x10.png", png(0, 10, 8, 0, b"\0" * 10), UNDECODABLE),
        case("png-0x0.png", png(0, 0, 8, 0, b""), UNDECODABLE),
        case("jpeg-0x8.jpg", jpeg_of(0, 8), UNDECODABLE),
        case("jpeg-8x0.jpg", jpeg_of(8, 0), UNDECODABLE),
        case("bmp-0x8.bmp", bmp_of(0, 8), UNDECODABLE),
        case("tiff-0x0.tif", tiff_with_size(0, 0), UNDECODABLE),
        case("gif-0x0-screen-with-a-1x1-frame.gif", gif(0, 0, [gif_pixel(0, 0)]), OK),
    ]


def _animations() -> List[Case]:
    pages = [photo(16, 16, seed=i) for i in range(40)]
    return [
        case("gif-5000-frames.gif", gif(16, 16, [gif_pixel(i % 16, i // 16 % 16) for i in range(5000)]), OK),
        case("webp-3000-frames.webp", many_frame_webp(3000), OK),
        case("apng-3000-frames.png", apng(3000), OK),
        case("tiff-40-pages.tif", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), OK),
        case("mpo-2-pictures.jpg", encode(pages[0], "MPO", save_all=True, append_images=pages[1:2]), OK),
    ]


def _orientations() -> List[Case]:
    seed = photo(40, 20)
    cases = [case(f"jpeg-exif-orientation-{o}.jpg", encode(seed, "JPEG", exif=exif_bytes(x0112=o)), OK)
             for o in range(1, 9)]
    cases += [case(f"png-exif-orientation-{o}.png", encode(seed, "PNG", exif=exif_bytes(x0112=o)), OK)
              for o in (3, 6)]
    cases += [case(f"webp-exif-orientation-{o}.webp", encode(seed, "WEBP", exif=exif_bytes(x0112=o)), OK)
              for o in (5, 8)]
    jpeg = encode(seed, "JPEG")
    cases += [
        case("jpeg-exif-orientation-0.jpg", encode(seed, "JPEG", exif=exif_bytes(x0112=0)), OK),
        case("jpeg-exif-orientation-9.jpg", encode(seed, "JPEG", exif=exif_bytes(x0112=9)), OK),
        case("jpeg-exif-orientation-65535.jpg", encode(seed, "JPEG", exif=exif_bytes(x0112=65535)), OK),
        case("jpeg-exif-orientation-4294967295.jpg",
             after_soi(jpeg, app1_exif(raw_exif([(ORIENTATION, 4, 1, struct.pack("<I", 2 ** 32 - 1))]))), OK),
        case("jpeg-exif-orientation-text.jpg", after_soi(jpeg, app1_exif(raw_exif([(ORIENTATION, 2, 4, b"six\0")]))),
             OK),
        case("jpeg-exif-orientation-pair.jpg", encode(seed, "JPEG", exif=exif_bytes(x0112=(6, 8))), OK),
        case("jpeg-exif-ifd-pointing-at-itself.jpg",
             after_soi(jpeg, app1_exif(raw_exif([(ORIENTATION, 3, 1, b"\6\0")], next_ifd=8))), OK),
        case("jpeg-exif-garbage.jpg", after_soi(jpeg, app1_exif(np.random.default_rng(SEED).bytes(300))), OK),
        case("jpeg-exif-not-tiff.jpg", after_soi(jpeg, app1_exif(b"MM\0*\xff\xff\xff\xff")), OK),
        case("jpeg-exif-64k.jpg", encode(seed, "JPEG", exif=exif_bytes(x0112=6, x9286=b"\0" * 65_000)), OK),
        case("png-exif-1500k.png", encode(seed, "PNG", exif=exif_bytes(x0112=8, x9286=b"\0" * 1_500_000)), OK),
        case("jpeg-exif-4000-tags.jpg",
             encode(seed, "JPEG", exif=exif_bytes(x0112=6, **{f"x{0xC000 + i:04x}": i for i in range(4000)})), OK),
    ]
    return cases


def _pixel_modes() -> List[Case]:
    rng = np.random.default_rng(SEED)
    seed = photo(32, 24)
    deep = (rng.integers(0, 65536, (24, 32))).astype(np.uint16)
    floats = rng.random((24, 32), dtype=np.float32)
    floats[0, :4] = [np.nan, np.inf, -np.inf, 1e30]
    rgb16 = b"".join(b"\0" + rng.integers(0, 65536, 32 * 3, dtype=np.uint16).astype(">u2").tobytes()
                     for _ in range(24))
    rgba16 = b"".join(b"\0" + rng.integers(0, 65536, 32 * 4, dtype=np.uint16).astype(">u2").tobytes()
                      for _ in range(24))
    palette = seed.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return [
        case("png-I;16.png", encode(Image.fromarray(deep), "PNG"), OK),
        case("tiff-I;16.tif", encode(Image.fromarray(deep), "TIFF"), OK),
        case("tiff-I;16B.tif", encode(Image.fromarray(deep.astype(">u2")), "TIFF"), OK),
        case("png-rgb-16-bit.png", png(32, 24, 16, 2, rgb16), OK),
        case("png-rgba-16-bit.png", png(32, 24, 16, 6, rgba16), OK),
        case("tiff-I-32-bit-signed.tif",
             encode(Image.fromarray(rng.integers(-2 ** 31, 2 ** 31 - 1, (24, 32)).astype(np.int32)), "TIFF"), OK),
        case("tiff-F-with-nan-and-inf.tif", encode(Image.fromarray(floats), "TIFF"), OK),
        case("tiff-F-all-nan.tif", encode(Image.fromarray(np.full((24, 32), np.nan, np.float32)), "TIFF"), OK),
        case("tiff-F-negative-and-huge.tif", encode(Image.fromarray((floats - 0.5) * 1e6), "TIFF"), OK),
        case("jpeg-cmyk.jpg", encode(seed.convert("CMYK"), "JPEG"), OK),
        case("tiff-cmyk.tif", encode(seed.convert("CMYK"), "TIFF"), OK),
        case("tiff-lab.tif", encode(Image.new("LAB", (32, 24), (50, 20, 200)), "TIFF"), OK),
        case("jpeg-grayscale.jpg", encode(seed.convert("L"), "JPEG"), OK),
        case("jpeg-progressive.jpg", encode(seed, "JPEG", progressive=True), OK),
        case("jpeg-progressive-optimized-444.jpg", encode(seed, "JPEG", progressive=True, optimize=True,
                                                          subsampling=0), OK),
        case("jpeg-restart-markers.jpg", encode(seed, "JPEG", restart_marker_blocks=1), OK),
        case("png-interlaced.png", adam7_png(np.asarray(seed)), OK),
        case("gif-interlaced.gif", encode(seed, "GIF", interlace=True), OK),
        case("png-palette-with-alpha-table.png", encode(palette, "PNG", transparency=bytes(range(0, 256, 16))), OK),
        case("png-palette-one-transparent.png", encode(palette, "PNG", transparency=3), OK),
        case("png-rgb-color-key.png", encode(seed, "PNG", transparency=(0, 0, 0)), OK),
        case("gif-transparent.gif", encode(palette, "GIF", transparency=0), OK),
        case("png-LA.png", encode(seed.convert("LA"), "PNG"), OK),
        case("tiff-LA.tif", encode(seed.convert("LA"), "TIFF"), OK),
        case("png-RGBA.png", encode(seed.convert("RGBA"), "PNG"), OK),
        case("webp-RGBA.webp", encode(seed.convert("RGBA"), "WEBP"), OK),
        case("bmp-RGBA.bmp", encode(seed.convert("RGBA"), "BMP"), OK),
        case("png-1-bit.png", encode(seed.convert("1"), "PNG"), OK),
        case("tiff-1-bit.tif", encode(seed.convert("1"), "TIFF"), OK),
        case("bmp-1-bit.bmp", encode(seed.convert("1"), "BMP"), OK),
        case("tiff-palette.tif", encode(palette, "TIFF"), OK),
        case("tiff-lzw.tif", encode(seed, "TIFF", compression="tiff_lzw"), OK),
        case("tiff-deflate.tif", encode(seed, "TIFF", compression="tiff_adobe_deflate"), OK),
        case("tiff-jpeg.tif", encode(seed, "TIFF", compression="jpeg"), OK),
    ]


def _icc_profiles() -> List[Case]:
    seed, garbage = photo(32, 24), np.random.default_rng(SEED).bytes(3000)
    return [
        *[case(f"srgb-icc.{ext}", encode(seed, fmt, icc_profile=srgb_profile()), OK)
          for fmt, ext in FORMATS.items() if fmt in ("JPEG", "PNG", "WEBP", "TIFF")],
        case("garbage-icc.jpg", encode(seed, "JPEG", icc_profile=garbage), OK),
        case("garbage-icc.png", encode(seed, "PNG", icc_profile=garbage), OK),
        case("icc-1500k-in-24-segments.jpg", encode(seed, "JPEG", icc_profile=garbage * 500), OK),
        case("icc-compressing-to-20m.png", png(1, 1, 8, 0, b"\0\0", png_chunk(
            b"iCCP", b"p\0\0" + zlib.compress(b"\0" * 20_000_000, 9))), UNDECODABLE),
    ]


def _shapes() -> List[Case]:
    one = Image.new("RGB", (1, 1), (10, 200, 30))
    thin = photo(1, 5000)
    flat = photo(5000, 1)
    cases = [case(f"1x1.{ext}", encode(one, fmt), OK) for fmt, ext in FORMATS.items()]
    cases += [case(f"1x5000.{ext}", encode(thin, fmt), OK) for fmt, ext in FORMATS.items()]
    cases += [case(f"5000x1.{ext}", encode(flat, fmt), OK) for fmt, ext in FORMATS.items()]
    return cases


def _floods() -> List[Case]:
    """Many small structures, each parsed in Python by Pillow (about a microsecond each), and the one
    libjpeg repeats over every block of the image."""
    jpeg, png_file = encode(photo(8, 8), "JPEG"), encode(photo(8, 8), "PNG")
    return [
        case("jpeg-100000-scans.jpg", progressive_scan_bomb(1000, 100_000), UNDECODABLE),
        case("jpeg-400000-comments.jpg", after_soi(jpeg, jpeg_segment(0xFE, b"") * 400_000), UNDECODABLE),
        case("jpeg-25000-quantization-tables.jpg",
             after_soi(jpeg, jpeg_segment(0xDB, b"\x00" + bytes(range(1, 65))) * 25_000), UNDECODABLE),
        case("png-100000-unknown-chunks.png", png_file[:33] + png_chunk(b"abCd", b"") * 100_000 + png_file[33:],
             UNDECODABLE),
        case("png-100000-text-chunks.png", png_file[:33] + png_chunk(b"tEXt", b"k\0v") * 100_000 + png_file[33:],
             UNDECODABLE),
        case("png-100000-empty-idat-chunks.png", png_file[:-12] + png_chunk(b"IDAT", b"") * 100_000 + png_file[-12:],
             UNDECODABLE),
        case("jpeg-1900000-fill-bytes.jpg", after_soi(jpeg, b"\xff" * 1_900_000), UNDECODABLE),
        case("png-idat-compressing-to-20m.png", png(100, 100, 8, 0, b"\0" * 20_000_000), OK),
        case("tiff-1000-strips.tif", striped_tiff(1000), OK),
        case("tiff-100000-strips.tif", striped_tiff(100_000), UNDECODABLE),
        case("gif-100000-comments.gif", gif(8, 8, [b"\x21\xfe\x01x\x00" * 100_000, gif_pixel(0, 0)]), OK),
    ]


def _not_images() -> List[Case]:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    html = b"<!DOCTYPE html>\n<html><head><title>cat</title></head><body><img src='cat.jpg'></body></html>\n"
    text = b"A photograph of a cat, described in words rather than pixels.\n" * 4
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cat.png", encode(photo(), "PNG"))
    pdf = (b"%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
           b"2 0 obj <</Type /Pages /Kids [] /Count 0>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n")
    mp4 = struct.pack(">I", 24) + b"ftypisom" + b"\0\0\x02\0isomiso2" + struct.pack(">I", 8) + b"mdat"
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0mif1heic" + struct.pack(">I", 8) + b"mdat"
    seed, rng = photo(), np.random.default_rng(SEED)
    return [
        case("svg.svg", svg, UNSUPPORTED),
        case("svg-with-xml-declaration.svg", b'<?xml version="1.0" encoding="UTF-8"?>\n' + svg, UNSUPPORTED),
        case("svg-with-bom-and-blank-lines.svg", b"\xef\xbb\xbf\n\n  " + svg, UNSUPPORTED),
        case("svg-with-comment-first.svg", b"<!-- drawn by hand -->\n" + svg, UNSUPPORTED),
        case("svgz.svgz", gzip.compress(svg, mtime=0), UNSUPPORTED),
        case("html.html", html, UNSUPPORTED),
        case("html-without-doctype.html", b"<html><body>hello</body></html>", UNSUPPORTED),
        case("html-then-a-png.html", html + encode(seed, "PNG"), UNSUPPORTED),
        case("xml.xml", b'<?xml version="1.0"?><note>hello</note>', UNSUPPORTED),
        case("zip-of-a-png.zip", archive.getvalue(), UNSUPPORTED),
        case("pdf.pdf", pdf, UNSUPPORTED),
        case("text-ascii.txt", text, UNSUPPORTED),
        case("text-utf8.txt", "Une photo d'un chat, décrite en mots: 猫.\n".encode(), UNSUPPORTED),
        case("text-utf16.txt", "a cat, in UTF-16\n".encode("utf-16"), UNSUPPORTED),
        case("text-short.txt", b"cat", UNSUPPORTED),
        case("json.json", b'{"image": "cat.jpg", "label": "cat"}', UNSUPPORTED),
        case("gzip.gz", gzip.compress(text, mtime=0), UNSUPPORTED),
        case("bzip2.bz2", bz2.compress(text), UNSUPPORTED),
        case("mp4.mp4", mp4, UNSUPPORTED),
        case("heic.heic", heic, UNSUPPORTED),
        case("avif.avif", encode(seed, "AVIF"), UNSUPPORTED),
        case("ico.ico", encode(seed, "ICO"), UNSUPPORTED),
        case("ppm.ppm", encode(seed, "PPM"), UNSUPPORTED),
        case("jpeg2000.jp2", encode(seed, "JPEG2000"), UNSUPPORTED),
        case("tga.tga", encode(seed, "TGA"), UNSUPPORTED),
        case("random-bytes.bin", rng.bytes(4096), UNDECODABLE),
        case("zero-bytes.bin", bytes(4096), UNDECODABLE),
        case("one-zero-byte.bin", b"\0", UNDECODABLE),
        case("text-then-random-bytes.bin", b"not an image" + rng.bytes(200), UNDECODABLE),
        case("empty.png", b"", EMPTY),
    ]


def image_corpus() -> List[Case]:
    """Every case, in a fixed order; the same bytes on every call."""
    seeds = _seed_files()
    return (seeds + _truncations(seeds) + _bit_flips(seeds) + _wrong_magic() + _declared_sizes() + _animations()
            + _orientations() + _pixel_modes() + _icc_profiles() + _shapes() + _floods() + _not_images())


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.reliability.image_corpus OUTDIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cases = image_corpus()
    for item in cases:
        (out / item.name).write_bytes(item.data)
    (out / "expected.tsv").write_text("".join(f"{c.name}\t{' | '.join(sorted(c.expected))}\n" for c in cases))
    print(f"{len(cases)} files in {out}")


if __name__ == "__main__":
    main()
