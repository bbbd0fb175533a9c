"""Image data as uint8 arrays [N, H, W, C] memory-mapped from prepared .npy files.

Training reads one `.npy` per split, written once by `prepare` from any supported source
(ImageNet-32/64 tars, npz batches, CIFAR-10, MNIST, folders of images, arrays):

    python -m axial_transformer.data prepare train_32x32.tar data/imagenet32/train.npy
    python -m axial_transformer.data prepare valid_32x32.tar data/imagenet32/test.npy

Pixels stay uint8 0..255 end to end: the model is discrete, so there is no dequantisation.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .builtin_data import builtin_dataset
from .formats import (
    FORMATS,
    PREPARE_HINT,
    SPLITS,
    Source,
    check_image_array,
    load_array,
    open_source,
)
from .io import atomic_write

__all__ = ["ImageArrayDataset", "builtin_dataset", "load_array", "open_split", "prepare"]

class ImageArrayDataset(Dataset):
    """Images of a uint8 array [N, H, W, C] (often a memmap) as uint8 tensors [C, H, W]."""

    def __init__(self, array: np.ndarray):
        self.array = check_image_array(array, "ImageArrayDataset")

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        # Always copy out of the (read-only) memmap, into CHW order, so the tensor owns its memory.
        return torch.from_numpy(np.array(self.array[index].transpose(2, 0, 1), order="C"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.array.shape[1:])


def split_path(spec: str | Path, split: str) -> Path:
    """A prepared .npy file, or `{split}.npy` inside a directory."""
    path = Path(spec)
    if not path.is_dir():
        return path
    file = path / f"{split}.npy"
    if not file.is_file():
        found = sorted(p.name for p in path.glob("*.npy")) or "no .npy files"
        raise FileNotFoundError(
            f"{file}: no {split!r} split in {path} (found {found}); {PREPARE_HINT}"
        )
    return file


def open_split(
    spec: str, split: str, image_size: tuple[int, int], channels: int
) -> ImageArrayDataset:
    """Open one split: "builtin", a prepared .npy file, or a directory holding `{split}.npy`.

    The images must be exactly `image_size` (H, W) with `channels` channels: resizing is a
    decision for `prepare`, not something to do silently at training time.
    """
    h, w = image_size
    if str(spec) == "builtin":
        return ImageArrayDataset(builtin_dataset(split, (h, w), channels))
    path = split_path(spec, split)
    array = load_array(path)
    found = tuple(array.shape[1:])
    if found != (h, w, channels):
        raise ValueError(
            f"{path}: expected images of H x W x C = {h} x {w} x {channels} "
            f"(image_size={[h, w]}, channels={channels}), "
            f"found {found[0]} x {found[1]} x {found[2]}"
        )
    if len(array) == 0:
        raise ValueError(f"{path}: holds no images")
    return ImageArrayDataset(array)


# ---- prepare: any source -> one uint8 .npy [N, H, W, C] ----


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (truncated, bad checksum, not an image)."""


# What Pillow raises on damaged files: OSError (truncated, unidentified), SyntaxError (bad PNG
# chunk or checksum), zlib.error, and the others for headers that lie about sizes.
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError
)
COMPACT_CHUNK = 4096  # rows moved at a time when closing the gaps left by skipped images


def decode_image(data: bytes, name: str, channels: int) -> np.ndarray:
    """Decode an image file to uint8 [H, W, C], converted to RGB (C = 3) or grayscale (C = 1)
    the way torchvision's ImageFolder does."""
    if channels not in (1, 3):
        raise ValueError(f"image files decode to 1 (grayscale) or 3 (RGB) channels, not {channels}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now, so that a truncated file fails here
            pixels = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"{name}: cannot decode image ({e})") from e
    return pixels.reshape(*pixels.shape[:2], channels)


def resize_box(image: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Resize [H, W, C] with a box filter (area average), as van den Oord et al. and Chrabaszcz
    et al. downsampled ImageNet; the aspect ratio is not kept."""
    h, w = image_size
    planes = [Image.fromarray(image[..., c]).resize((w, h), Image.Resampling.BOX)
              for c in range(image.shape[2])]
    return np.stack([np.asarray(p) for p in planes], axis=-1)


def to_image(
    payload: bytes | np.ndarray,
    name: str,
    channels: int,
    image_size: tuple[int, int] | None,
    resize: bool,
) -> np.ndarray:
    image = decode_image(payload, name, channels) if isinstance(payload, bytes) else payload
    if image.shape[2] != channels:
        c = image.shape[2]
        raise ValueError(f"{name}: has {c} channels, expected {channels} (pass --channels {c})")
    if image_size is not None and image.shape[:2] != image_size:
        if not resize:
            raise ValueError(
                f"{name}: is {image.shape[0]}x{image.shape[1]}, expected "
                f"{image_size[0]}x{image_size[1]}; pass resize=True (--resize) to resize"
            )
        image = resize_box(image, image_size)
    return image


def write_images(
    source: Source,
    path: Path,
    image_size: tuple[int, int] | None,
    channels: int,
    resize: bool,
    on_error: str,
    progress: bool,
) -> tuple[int, list[str]]:
    """Decode every record into a memmap at `path`; returns (images written, names skipped).

    The memmap is created at the first image (whose size, unless given, sets everyone's) with
    room for all records; rows of skipped images are closed up at the end and the array shrunk.
    """
    images, first, skipped = None, None, []
    written = np.zeros(source.count, dtype=bool)
    bar = tqdm(source.records, total=source.count, unit="img", disable=not progress,
               desc=f"{source.format} {source.path.name}")
    for index, name, payload in bar:
        try:
            image = to_image(payload, name, channels, image_size, resize)
        except CorruptImageError as e:
            if on_error == "raise":
                raise
            skipped.append(str(e))
            continue
        if images is None:
            first = name
            shape = (source.count, *image.shape)
            images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        elif image.shape != images.shape[1:]:
            raise ValueError(
                f"{name}: is {'x'.join(map(str, image.shape))} (HxWxC) but {first} is "
                f"{'x'.join(map(str, images.shape[1:]))}; pass image_size (--image-size H W) "
                f"and resize=True (--resize) to resize them all"
            )
        images[index] = image
        written[index] = True
    if images is None:
        raise ValueError(f"{source.path}: no image could be read ({len(skipped)} skipped)")
    count, row_shape, offset = int(written.sum()), images.shape[1:], images.offset
    if count < source.count:
        keep = np.flatnonzero(written)
        for start in range(0, count, COMPACT_CHUNK):  # keep[i] >= i: rows only move towards 0
            rows = keep[start : start + COMPACT_CHUNK]
            images[start : start + len(rows)] = images[rows]
    images.flush()
    del images  # unmap before the file is shrunk
    if count < source.count:
        set_npy_length(path, count, row_shape, offset)
    return count, skipped


def set_npy_length(path: Path, count: int, row_shape: tuple[int, ...], offset: int) -> None:
    """Rewrite a uint8 .npy header in place for `count` rows and cut the file after them."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (count, *row_shape)}
    )
    # numpy pads every header so that the first axis can grow or shrink in place.
    assert len(header.getvalue()) == offset, "npy header length changed"
    with open(path, "r+b") as f:
        f.write(header.getvalue())
        f.truncate(offset + count * math.prod(row_shape))


def prepare(
    source: str | Path,
    out_path: str | Path,
    *,
    format: str = "auto",
    split: str = "train",
    image_size: tuple[int, int] | None = None,
    channels: int = 3,
    on_error: str = "skip",
    resize: bool = False,
    progress: bool = True,
) -> int:
    """Convert one split of `source` into a uint8 .npy [N, H, W, C] at `out_path`; returns N.

    Images must all be `image_size` (or, if None, the size of the first one); a different size
    is an error naming the file, unless `resize=True` box-resizes everything to `image_size`.
    Image files are converted to RGB or grayscale to match `channels`; array sources must
    already have `channels` channels. Undecodable image files are skipped with a warning
    (`on_error="skip"`) or stop the run (`"raise"`). The output appears atomically: a failed
    run leaves no partial file.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be two positive ints (H, W), got {image_size}")
    if resize and image_size is None:
        raise ValueError("resize=True needs image_size (--image-size H W) to resize to")
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise ValueError(f"{out_path}: the output must be a .npy file")

    src = open_source(source, format, split)
    if src.note:
        warnings.warn(src.note, stacklevel=2)
    count, skipped = 0, []

    def write(tmp: Path) -> None:
        nonlocal count, skipped
        count, skipped = write_images(src, tmp, image_size, channels, resize, on_error, progress)
        umask = os.umask(0)  # the temporary file is private (0600); give OUT the usual mode
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)

    atomic_write(out_path, write)
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {shown}", stacklevel=2)
    if src.expected_count is not None and count != src.expected_count:
        warnings.warn(
            f"{src.path.name} should hold {src.expected_count:,} images (van den Oord et al.), "
            f"but {count:,} were written: the copy may be incomplete or damaged",
            stacklevel=2,
        )
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m axial_transformer.data",
        description="Convert image data into the uint8 .npy arrays that training memory-maps.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "prepare",
        help="convert SOURCE into OUT.npy [N, H, W, C]",
        description="Convert SOURCE (a tar or folder of PNG/JPEG images, npz batches, CIFAR-10, "
        "MNIST, or a .npy) into a uint8 OUT.npy [N, H, W, C].",
    )
    cmd.add_argument("source", help="file or directory to read")
    cmd.add_argument("out", help="the .npy file to write")
    cmd.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    cmd.add_argument("--split", default="train", choices=SPLITS,
                     help="which split of a multi-split source (CIFAR-10, MNIST, npz folder)")
    cmd.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                     help="required size (default: the size of the first image)")
    cmd.add_argument("--resize", action="store_true",
                     help="box-resize images to --image-size instead of refusing other sizes")
    cmd.add_argument("--channels", type=int, default=3, help="3 (RGB) or 1 (grayscale)")
    cmd.add_argument("--on-error", default="skip", choices=("skip", "raise"),
                     help="what to do with an image file that cannot be decoded")
    args = parser.parse_args(argv)

    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        count = prepare(args.source, args.out, format=args.format, split=args.split,
                        image_size=args.image_size, channels=args.channels,
                        on_error=args.on_error, resize=args.resize)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        parser.exit(2, f"error: {e}\n")
    shape = list(load_array(args.out).shape[1:])
    print(f"wrote {count:,} images of [H, W, C] = {shape} to {args.out}")


if __name__ == "__main__":
    main()
