"""PNG and JPEG files read within bounds: their bytes, checked before they are read, and their
pixels, checked from the header before they are decoded. A PNG of a few kilobytes can declare
100,000 x 100,000 pixels (a decompression bomb), a tar of a few kilobytes can hold a sparse member
of 20 GB. Pillow's own bomb check (`Image.MAX_IMAGE_PIXELS`) is a process-wide setting that only
warns below twice its limit, so the limit here is checked where each file is opened."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# 32 Mi pixels (8192 x 4096, a 30-megapixel photograph) decode to at most 128 MiB (4 bytes a
# pixel); with the file's bytes and the copies of the conversion to RGB that stays near 400 MiB.
# The paper's images are 32 x 32 and 64 x 64.
MAX_IMAGE_PIXELS = 2**25
# 128 MiB is as much as that many pixels of noise take as a PNG.
MAX_IMAGE_BYTES = 2**27

# What Pillow raises on damaged files: OSError (truncated, unidentified), SyntaxError (bad PNG
# chunk or checksum), zlib.error, and the others for headers that lie about sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error,
                 Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (truncated, bad checksum, not an image, too large)."""


def check_image_bytes(size: int, name: str) -> None:
    if size > MAX_IMAGE_BYTES:
        raise CorruptImageError(f"{name}: {size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an "
                                f"image file may have; not read")


def decode_image(data: bytes | Path, name: str, mode: str | None) -> np.ndarray:
    """An image file (its bytes or its path) converted to a Pillow `mode` ("RGB", "L") or, with
    None, as stored (a palette as RGB) -> uint8 [H, W, C]; any failure is a CorruptImageError."""
    if isinstance(data, Path):
        check_image_bytes(data.stat().st_size, name)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise CorruptImageError(f"{name}: declares {im.width} x {im.height} pixels, more "
                                        f"than the {MAX_IMAGE_PIXELS:,} an image may have; not "
                                        f"decoded")
            im.load()  # decode now, so that a truncated file fails here
            image = np.asarray(im.convert(mode or ("RGB" if im.mode == "P" else im.mode)))
    except CorruptImageError:
        raise
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"{name}: cannot decode image ({e})") from e
    return image[..., None] if image.ndim == 2 else image


def resize_box(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] resized with a box filter (area average), as van den Oord et al. and Chrabaszcz
    et al. downsampled ImageNet; the aspect ratio is not kept."""
    planes = [Image.fromarray(image[..., c]).resize(size[::-1], Image.Resampling.BOX)
              for c in range(image.shape[2])]
    return np.stack(planes, axis=-1)


def read_image_file(path: str | Path, channels: int, size: tuple[int, int],
                    resize: bool = False) -> np.ndarray:
    """One image file as a model of `size` (H, W) and `channels` takes it -> writable uint8
    [H, W, C], box-resized to `size` with `resize`; a ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found")
    image = decode_image(path, str(path), None)
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: expected 8-bit pixels, got {image.dtype}")
    if resize and image.shape[2] == channels and image.shape[:2] != size:
        image = resize_box(image, size)
    if image.shape != (*size, channels):
        raise ValueError(f"{path}: the model takes {size[0]}x{size[1]} images with {channels} "
                         f"channel(s), got {image.shape[0]}x{image.shape[1]} with "
                         f"{image.shape[2]}")
    return image.copy()  # writable (Pillow's array is not), and only the size the model takes
