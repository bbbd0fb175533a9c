"""Compress images losslessly with a trained Axial Transformer: the file takes the model's bits/dim.

    python compress.py --checkpoint runs/demo photo.png photos/ -o photos.axc
    python compress.py --checkpoint runs/demo data/cifar10/test.npy:0:1000 -o test.axc

IMAGES are PNG/JPEG files of the model's size and channel count, folders of them (their .png,
.jpg and .jpeg files in name order), or PATH.npy[:START:STOP]: images START to STOP-1 (all of
them without the range) of a prepared uint8 [N, H, W, C] array. A JPEG is kept as decoded: the
codec is lossless about its pixels, not about the JPEG file. --checkpoint takes a run directory,
one of its checkpoints or an export directory. Prints the bytes written, bits/dim and images/s;
`python decompress.py photos.axc --checkpoint runs/demo --out DIR` gives the images back, bit for
bit, with the same model on the same kind of machine.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from .codec_cli import (
    CLIError,
    add_common_arguments,
    load_model,
    run_reporting_errors,
)
from .data import read_image_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_RANGE = re.compile(r"(?P<path>.+\.npy)(:(?P<start>\d*):(?P<stop>\d*))?")


def read_images(specs: list[str], channels: int, size: tuple[int, int]) -> np.ndarray:
    """Every image the specs name, in order -> uint8 [N, H, W, C], each checked against the
    model's size and channel count."""
    images = []
    for spec in specs:
        if spec.endswith(".npy") or ".npy:" in spec:
            images.extend(read_array_range(spec, channels, size))
        elif Path(spec).is_dir():
            files = sorted(p for p in Path(spec).iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise CLIError(f"{spec}: a folder without PNG or JPEG files")
            images.extend(read_image_file(f, channels, size) for f in files)
        else:
            images.append(read_image_file(Path(spec), channels, size))
    return np.stack(images)


def read_array_range(spec: str, channels: int, size: tuple[int, int]) -> np.ndarray:
    """PATH.npy or PATH.npy:START:STOP of a prepared uint8 [N, H, W, C] array."""
    from .formats import load_array

    match = ARRAY_RANGE.fullmatch(spec)
    if match is None:
        raise CLIError(f"{spec}: expected PATH.npy or PATH.npy:START:STOP (a range of images)")
    array = load_array(match["path"])  # a missing, damaged or object array names the file
    if tuple(array.shape[1:]) != (*size, channels):
        raise CLIError(f"{match['path']}: holds {'x'.join(map(str, array.shape[1:]))} images "
                       f"(H x W x C); the model's are {size[0]}x{size[1]}x{channels}")
    start, stop = (int(match[k]) if match[k] else None for k in ("start", "stop"))
    selected = array[start:stop]
    if len(selected) == 0:
        raise CLIError(f"{spec}: selects no images (the array holds {len(array)})")
    return np.array(selected)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGES",
                        help="PNG/JPEG files, folders of them, or PATH.npy[:START:STOP]")
    parser.add_argument("-o", "--out", required=True, help="the .axc file to write")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images coded at once (decoding runs the same batches)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads, recorded for decoding (default: 1 below a batch of "
                        "8, where more are slower, otherwise torch's)")
    parser.add_argument("--device", default="cpu",
                        help="where the model runs; the file decodes on the same kind of "
                        "device only (default cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: compress_files(args), args.debug)


def compress_files(args: argparse.Namespace) -> int:
    from .codec import compress
    from .codec_format import unpack
    from .io import atomic_write

    out = Path(args.out)
    if out.suffix != ".axc":
        raise CLIError(f"-o {out}: expected a .axc file")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    model = load_model(args.checkpoint, args.device)
    c, (h, w) = model.config.channels, model.config.image_size
    images = torch.from_numpy(read_images(args.images, c, (h, w))).permute(0, 3, 1, 2)
    start = time.perf_counter()
    data = compress(model, images, args.batch_size, args.threads, progress=True)
    seconds = time.perf_counter() - start
    atomic_write(out, lambda tmp: tmp.write_bytes(data))
    _, payload = unpack(data)
    print(f"{len(images)} images of {c}x{h}x{w} -> {out}: {len(data):,} bytes "
          f"({len(data) - len(payload)} of header), {8 * len(data) / images.numel():.3f} "
          f"bits/dim, {len(images) / seconds:.1f} images/s")
    return 0
