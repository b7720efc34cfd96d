"""Image bytes -> a decoded PIL image, strictly: what is refused is refused from the header,
before decoding (too many pixels, bytes of another kind such as SVG, PDF or text, files built to
cost far more to decode than their size suggests); EXIF orientation is applied; a JPEG much
larger than the caller needs decodes at a reduced scale.
"""
import codecs
import io
import re
import struct
from pathlib import Path
from typing import Collection, Optional, Tuple, Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[bytes, str, Path, Image.Image]


class ImageDecodeError(ValueError):
    """Bytes that are not an image PIL can decode."""


class ImageTooLargeError(ValueError):
    """An image with more pixels than allowed (refused from its header, before decoding)."""


class UnsupportedImageFormatError(ValueError):
    """An image in a format the caller does not accept, or bytes recognisably of another kind (SVG, PDF, text)."""


# Bytes Pillow cannot open but that recognisably are something else, by their leading bytes (matched
# from the first one): answered "unsupported format" rather than "undecodable image".
NON_IMAGE_SIGNATURES = [(re.compile(pattern, re.DOTALL), kind) for pattern, kind in [
    (rb"%PDF-", "a PDF document"),
    (rb"%!PS", "a PostScript document"),
    (rb"PK\x03\x04|PK\x05\x06", "a ZIP archive (or a document stored as one)"),
    (rb"\x1f\x8b", "gzip-compressed data (an SVGZ drawing or a .gz file)"),
    (rb"BZh[1-9]1AY&SY", "bzip2-compressed data"),
    (rb"\xfd7zXZ\x00", "xz-compressed data"),
    (rb"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (rb"Rar!\x1a\x07", "a RAR archive"),
    (rb"\x7fELF", "an ELF executable"),
    (rb"....ftyp(heic|heix|hevc|heim|heis|mif1|msf1)", "a HEIF (HEIC) image, a format not decoded here"),
    (rb"....ftyp(avif|avis)", "an AVIF image, a format not decoded here"),
    (rb"....ftyp", "an MP4 or QuickTime video"),
    (rb"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a|\xff\x0a", "a JPEG XL image, a format not decoded here"),
    (rb"RIFF....WAVE", "a WAV audio file"),
    (rb"RIFF....AVI ", "an AVI video"),
    (rb"\x1a\x45\xdf\xa3", "a Matroska or WebM video"),
    (rb"OggS", "an Ogg audio or video file"),
    (rb"ID3", "an MP3 audio file"),
]]
# Leading bytes of the formats served: bytes starting with one, or cut short inside one, are a broken
# image (undecodable), even when what follows reads as text.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                    b"RIFF")
SNIFF_BYTES = 1024
# Control characters that do not occur in text (tab, line breaks, form feed, backspace and escape do).
CONTROL_BYTES = bytes(sorted(set(range(32)) - set(b"\t\n\r\f\b\x1b"))) + b"\x7f"

# Structures Pillow parses in Python, about a microsecond each, and the one libjpeg repeats over the
# whole image: more of them than real files hold means a file built to cost more to decode than its
# size suggests (2 MB of empty JPEG segments took 1.5 s, 100,000 progressive scans of 12 bytes each
# over a 1000x1000 image 36 s).
MAX_JPEG_SCANS = 100  # libjpeg's progressive scripts write 10 scans (colour) or 6 (grey)
MAX_JPEG_SEGMENTS = 1000  # before the first scan; real files hold tens (metadata, tables, frame header)
MAX_PNG_CHUNKS = 20_000  # up to the second frame; a 20 MB PNG in libpng's 8 kB IDAT chunks has 2,500
MAX_TIFF_STRIPS = 50_000  # strips or tiles; one strip per row is common


def open_image(source: Union[bytes, str, Path], max_pixels: Optional[int] = None,
               formats: Optional[Collection[str]] = None) -> Image.Image:
    """Open an image without decoding its pixels: its format, size and mode as its header says, refused
    as ``load_image`` refuses it for its bytes, its format or its size.

    ``max_pixels`` is checked on the header (decompression bombs) and capped at Pillow's own limit;
    ``formats`` (PIL format names such as "PNG") restricts what is accepted.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    limit = _pixel_limit(max_pixels)
    _refuse_costly_structure(data)
    image = _open(data, limit)
    if formats is not None and image.format not in formats:
        raise UnsupportedImageFormatError(
            f"image format {image.format} is not accepted; send one of {', '.join(sorted(formats))}")
    if limit is not None and image.width * image.height > limit:
        raise _too_large(image.size, limit)
    return image


def load_image(source: ImageSource, max_pixels: Optional[int] = None, formats: Optional[Collection[str]] = None,
               min_side: Optional[int] = None) -> Image.Image:
    """Open and fully decode an image (first frame of animations), upright per its EXIF orientation.

    ``max_pixels`` and ``formats`` as for ``open_image``, which refuses before any pixel is decoded.
    ``min_side``, the shortest side the caller's transform needs, lets a JPEG at least twice as large
    decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) with both sides kept at least that long;
    smaller images decode in full, exactly as without it.
    """
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source)
    image = open_image(source, max_pixels, formats)
    if min_side is not None and image.format in ("JPEG", "MPO") and min(image.size) >= 2 * min_side:
        image.draft(image.mode, (min_side, min_side))
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image of {image.width}x{image.height} pixels: {e}") from e
    except Exception as e:  # whatever the decoder raises on these bytes (see _open)
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    return image


def _pixel_limit(max_pixels: Optional[int]) -> Optional[int]:
    """The caller's limit, capped at Pillow's (Image.open refuses images over twice
    Image.MAX_IMAGE_PIXELS, 178,956,970 pixels by default, which is also the limit when the caller
    sets none)."""
    pillow = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    limits = [limit for limit in (max_pixels, pillow) if limit is not None]
    return min(limits) if limits else None


def _open(data: bytes, limit: Optional[int]) -> Image.Image:
    """Image.open, with its failures in this module's terms.

    Pillow's decompression bomb check stays on rather than being disabled for ours: some plugins (WebP,
    GIF) run it before they allocate a canvas, which happens before any size reaches this module. When
    it fires, the size is re-read from the header by the plugin alone, so that the refusal names the
    image's dimensions and the limit the caller gave, not Pillow's."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _too_large(_declared_size(data), limit) from e
    # Pillow's parsers fail on hostile bytes with many exception types (OSError, SyntaxError, ValueError,
    # EOFError, struct.error, IndexError...): whatever they raise on the bytes given is the bytes' fault.
    except Exception as e:
        kind = _non_image_kind(data)
        if kind is not None:
            raise UnsupportedImageFormatError(f"not an image: the bytes look like {kind}") from e
        if isinstance(e, UnidentifiedImageError):
            raise ImageDecodeError("cannot decode image: not an image file in a format PIL reads") from e
        raise ImageDecodeError(f"cannot decode image: {e}") from e


def _declared_size(data: bytes) -> Optional[Tuple[int, int]]:
    """The size in the header of an image Image.open refused as a decompression bomb, read by the plugin
    that claims the bytes, as Image.open calls it but without the check that follows; None when the
    plugin itself refuses the size (WebP, and GIF frames larger than their canvas)."""
    for name in Image.ID:  # the plugins Image.open tried, in its order
        factory, accept = Image.OPEN[name]
        claimed = accept is None or accept(data[:16])
        if claimed and not isinstance(claimed, str):
            try:
                return factory(io.BytesIO(data)).size
            except Exception:  # not this plugin's, or refused by it: as Image.open, try the next
                continue
    return None


def _too_large(size: Optional[Tuple[int, int]], limit: Optional[int]) -> ImageTooLargeError:
    image = f"image of {size[0]}x{size[1]} pixels" if size is not None else "image"
    return ImageTooLargeError(f"{image} is over the limit of {limit} pixels (refused from its header)")


def _non_image_kind(data: bytes) -> Optional[str]:
    """What bytes that are not an image look like, from their first SNIFF_BYTES bytes: a known
    signature, markup (SVG, HTML, XML) or text; None for anything else, such as a broken image or noise."""
    head = data[:SNIFF_BYTES]
    for signature, kind in NON_IMAGE_SIGNATURES:
        if signature.match(head):
            return kind
    markup = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # after a UTF-8 byte order mark
    if markup.startswith((b"<?xml", b"<!doctype", b"<!--", b"<svg", b"<html", b"<head", b"<body")):
        if b"<svg" in markup:
            return "an SVG drawing, a vector format not decoded here"
        if b"<html" in markup or markup.startswith(b"<!doctype html"):
            return "an HTML page"
        return "an XML document"
    if any(head.startswith(image) or image.startswith(head) for image in IMAGE_SIGNATURES):
        return None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text"
    if head.translate(None, CONTROL_BYTES) != head:
        return None
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(data) <= SNIFF_BYTES)
    except UnicodeDecodeError:
        return None
    return "text"


def _refuse_costly_structure(data: bytes) -> None:
    """Refuse, before Pillow parses them, JPEGs, PNGs and TIFFs with more scans, segments, chunks or
    strips than real files hold (see MAX_JPEG_SCANS and below): cheap counts, stopped at the limit."""
    if data.startswith(b"\xff\xd8"):
        # 0xFF 0xDA starts a scan; entropy-coded data never holds it (a 0xFF there is followed by 0x00).
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(f"cannot decode image: a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} "
                                   f"decoded here")
        if _jpeg_header_segments(data) > MAX_JPEG_SEGMENTS:
            raise ImageDecodeError(f"cannot decode image: a JPEG of more than {MAX_JPEG_SEGMENTS} segments "
                                   f"before its first scan")
    elif data.startswith(b"\x89PNG\r\n\x1a\n") and _png_chunks(data) > MAX_PNG_CHUNKS:
        raise ImageDecodeError(f"cannot decode image: a PNG of more than {MAX_PNG_CHUNKS} chunks")
    elif data.startswith((b"II", b"MM")) and _tiff_strips(data) > MAX_TIFF_STRIPS:
        raise ImageDecodeError(f"cannot decode image: a TIFF of {_tiff_strips(data)} strips or tiles, more than "
                               f"the {MAX_TIFF_STRIPS} decoded here")


def _jpeg_header_segments(data: bytes) -> int:
    """Segments (and 0xFF fill bytes, which Pillow reads one at a time) before the first scan, counted up to
    one over MAX_JPEG_SEGMENTS."""
    offset, segments = 2, 0
    while segments <= MAX_JPEG_SEGMENTS and offset + 4 <= len(data) and data[offset] == 0xFF:
        if data[offset + 1] == 0xDA:
            break
        segments += 1
        offset += 1 if data[offset + 1] == 0xFF else 2 + int.from_bytes(data[offset + 2:offset + 4], "big")
    return segments


def _png_chunks(data: bytes) -> int:
    """Chunks up to IEND or the second frame's control chunk (Pillow reads no further), counted up to one
    over MAX_PNG_CHUNKS."""
    offset, chunks, frames = 8, 0, 0
    while chunks <= MAX_PNG_CHUNKS and offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        frames += kind == b"fcTL"
        if kind == b"IEND" or frames == 2:
            break
        chunks += 1
        offset += 12 + length
    return chunks


def _tiff_strips(data: bytes) -> int:
    """The strips or tiles of a TIFF's first image, which Pillow lists in Python as it opens it: the count
    of the first IFD's StripOffsets or TileOffsets (classic or BigTIFF); 0 when unreadable, for Pillow to
    refuse."""
    order = "<" if data.startswith(b"II") else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        ifd = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
        entries = struct.unpack_from(order + ("Q" if big else "H"), data, ifd)[0]
        for i in range(min(entries, 65_535)):
            tag, _, count = struct.unpack_from(order + ("HHQ" if big else "HHI"), data,
                                               ifd + (8 + 20 * i if big else 2 + 12 * i))
            if tag in (273, 324):  # StripOffsets, TileOffsets
                return count
    except (struct.error, OverflowError):  # cut short, or an offset past any file: Pillow says why
        pass
    return 0
