"""Compress images losslessly with a trained Axial Transformer: the file takes the model's bits/dim.

    python compress.py --checkpoint runs/demo photo.png photos/ -o photos.axc
    python compress.py --checkpoint runs/demo data/cifar10/test.npy:0:1000 -o test.axc
    python compress.py --checkpoint runs/fashion shoe.png bag.png --labels 7,8 -o two.axc

IMAGES are PNG/JPEG files of the model's size and channel count, folders of them (their .png,
.jpg and .jpeg files in name order), or PATH.npy[:START:STOP]: images START to STOP-1 (all of
them without the range) of a prepared uint8 [N, H, W, C] array. A JPEG is kept as decoded: the
codec is lossless about its pixels, not about the JPEG file. --checkpoint takes a run directory,
one of its checkpoints or an export directory. A class-conditional model takes the images'
classes with --labels. When every image comes from a file, the file keeps their names, and
decompress.py writes them back under those names. Prints the bytes written, bits/dim and
images/s; `python decompress.py photos.axc --checkpoint runs/demo --out DIR` gives the images
back, bit for bit, with the same model on any machine.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..codec.format import safe_name
from ..data.splits import read_image_file
from .common import (
    CLIError,
    add_common_arguments,
    add_compute_arguments,
    check_writable_file,
    load_model,
    run_reporting_errors,
    write_output,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_RANGE = re.compile(r"(?P<path>.+\.npy)(:(?P<start>\d*):(?P<stop>\d*))?")


def read_images(specs: list[str], channels: int,
                size: tuple[int, int]) -> tuple[np.ndarray, list[str] | None]:
    """Every image the specs name, in order -> (uint8 [N, H, W, C], each checked against the
    model's size and channel count; their PNG names when every one came from a file, else
    None)."""
    images, files = [], []
    for spec in specs:
        if spec.endswith(".npy") or ".npy:" in spec:
            selected = read_array_range(spec, channels, size)
            images.extend(selected)
            files.extend([None] * len(selected))
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise CLIError(f"{spec}: a folder without PNG or JPEG files")
            images.extend(read_image_file(f, channels, size) for f in found)
            files.extend(found)
        else:
            images.append(read_image_file(Path(spec), channels, size))
            files.append(Path(spec))
    return np.stack(images), png_names(files)


def png_names(files: list[Path | None]) -> list[str] | None:
    """The names decompress.py writes the images under: each file's stem plus .png, a -2, -3,
    ... after a name already taken; None unless every image came from a file."""
    if any(f is None for f in files):
        return None
    names: list[str] = []
    taken: set[str] = set()
    for f in files:
        stem = f.stem if safe_name(f"{f.stem}.png") else "image"
        name, k = f"{stem}.png", 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}.png"
        names.append(name)
        taken.add(name)
    return names


def parse_labels(text: str | None, count: int) -> torch.Tensor | None:
    """--labels: one class per image, comma-separated, or one for all; -1 for none."""
    if text is None:
        return None
    try:
        labels = [int(k) for k in text.split(",")]
    except ValueError:
        raise CLIError(f"--labels {text!r}: expected integers separated by commas") from None
    if len(labels) == 1:
        labels *= count
    if len(labels) != count:
        raise CLIError(f"--labels: {len(labels)} classes for {count} images; give one per "
                       "image, or one for all")
    return torch.tensor(labels)


def read_array_range(spec: str, channels: int, size: tuple[int, int]) -> np.ndarray:
    """PATH.npy or PATH.npy:START:STOP of a prepared uint8 [N, H, W, C] array."""
    from ..data.sources import load_array

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
    parser.add_argument("--labels",
                        help="a class-conditional model's classes of the images: one per "
                        "image, comma-separated, or one for all (-1: no class)")
    add_compute_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: compress_files(args), args.debug)


def compress_files(args: argparse.Namespace) -> int:
    from ..codec.coder import compress
    from ..codec.format import unpack

    out = Path(args.out)
    if out.suffix != ".axc":
        raise CLIError(f"-o {out}: expected a .axc file")
    check_writable_file(out, "-o")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    model = load_model(args.checkpoint, args.device)
    c, (h, w) = model.config.channels, model.config.image_size
    array, names = read_images(args.images, c, (h, w))
    images = torch.from_numpy(array).permute(0, 3, 1, 2)
    labels = parse_labels(args.labels, len(images))
    start = time.perf_counter()
    data = compress(model, images, args.batch_size, args.threads, progress=True, labels=labels,
                    names=names)
    seconds = time.perf_counter() - start
    _, payload = unpack(data)
    print(f"{len(images)} images of {c}x{h}x{w}: {len(data):,} bytes "
          f"({len(data) - len(payload)} of header), {8 * len(data) / images.numel():.3f} "
          f"bits/dim, {len(images) / seconds:.1f} images/s", flush=True)
    write_output(out, lambda tmp: tmp.write_bytes(data))
    print(f"wrote {out}")
    return 0
