"""Image files read within bounds: the bytes a file may hold, checked before it is read, and the
pixels it may decode to, checked from its header before it is decoded.

A PNG of a few kilobytes can declare 100,000 x 100,000 pixels (a decompression bomb), and a tar
of a few kilobytes can hold a sparse member of 20 GB; neither may make us allocate more than the
limits below allow. Pillow's own bomb check (`Image.MAX_IMAGE_PIXELS`) is a process-wide setting
that only warns below twice its limit, so the limit here is checked where each file is opened.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# 32 Mi pixels (8192 x 4096, a 30-megapixel photograph) decode to at most 128 MiB (4 bytes a
# pixel); with the file's bytes and the copies of the conversion to RGB that stays near 400 MiB.
# The paper's images are 32 x 32 and 64 x 64.
MAX_IMAGE_PIXELS = 2**25
# An image file larger than this is refused before it is read: 128 MiB is as much as that many
# pixels of noise take as a PNG.
MAX_IMAGE_BYTES = 2**27

# What Pillow raises on damaged files: OSError (truncated, unidentified), SyntaxError (bad PNG
# chunk or checksum), zlib.error, and the others for headers that lie about sizes.
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError
)


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (truncated, bad checksum, not an image, too large)."""


def check_image_bytes(size: int, name: str) -> None:
    """Refuse an image file of `size` bytes before reading it."""
    if size > MAX_IMAGE_BYTES:
        raise CorruptImageError(f"{name}: {size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an "
                                f"image file may have; not read")


def check_image_pixels(image: Image.Image, name: str) -> None:
    """Refuse an opened (not yet decoded) image whose header declares too many pixels."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise CorruptImageError(f"{name}: declares {width} x {height} pixels, more than the "
                                f"{MAX_IMAGE_PIXELS:,} an image may have; not decoded")


def read_image_bytes(path: Path) -> bytes:
    """The bytes of an image file, refused by its size before any is read."""
    check_image_bytes(path.stat().st_size, str(path))
    return path.read_bytes()


def decode_image(data: bytes | Path, name: str, mode: str) -> np.ndarray:
    """Decode an image file (its bytes or its path) converted to a Pillow `mode` ("RGB", "L")
    or, with mode None, as stored (a palette converted to RGB) -> uint8 array [H, W] or
    [H, W, C]. Every failure is a CorruptImageError naming the file."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            check_image_pixels(im, name)
            im.load()  # decode now, so that a truncated file fails here
            if mode is None and im.mode == "P":
                mode = "RGB"
            return np.asarray(im.convert(mode) if mode else im)
    except CorruptImageError:
        raise
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"{name}: cannot decode image ({e})") from e
