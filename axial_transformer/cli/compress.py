"""Compress images losslessly with a trained Axial Transformer: the file takes the model's bits/dim.

    python compress.py --checkpoint runs/demo photo.png photos/ -o photos.axc
    python compress.py --checkpoint runs/demo data/cifar10/test.npy:0:1000 -o test.axc
    python compress.py --checkpoint runs/fashion shoe.png bag.png --labels 7,8 -o two.axc

IMAGES are PNG/JPEG files of the model's size and channel count, folders of them (in name order)
or PATH.npy[:START:STOP], images START to STOP-1 of a prepared uint8 [N, H, W, C] array. A JPEG
is kept as decoded. When every image comes from a file, the file keeps their names for
decompress.py, which gives the images back bit for bit with the same model on any machine.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..codec.format import safe_name
from ..data.image_files import IMAGE_SUFFIXES, read_image_file
from .common import CLIError, check_output, codec_parser, load_model, run_command, write_outputs

ARRAY_RANGE = re.compile(r"(?P<path>.+\.npy)(:(?P<start>\d*):(?P<stop>\d*))?")


def read_images(specs: list[str], channels: int,
                size: tuple[int, int]) -> tuple[np.ndarray, list[str] | None]:
    """Every image the specs name, in order, as uint8 [N, H, W, C], and their PNG names when
    every one came from a file."""
    images, found = [], []
    for spec in specs:
        if spec.endswith(".npy") or ".npy:" in spec:
            selected = read_array_range(spec, channels, size)
            images.extend(selected)
            found.extend([None] * len(selected))
            continue
        paths = [Path(spec)]
        if paths[0].is_dir():
            paths = sorted(p for p in paths[0].iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not paths:
                raise CLIError(f"{spec}: a folder without PNG or JPEG files")
        images.extend(read_image_file(p, channels, size) for p in paths)
        found.extend(paths)
    return np.stack(images), None if None in found else png_names(found)


def png_names(paths: list[Path]) -> list[str]:
    """Each file's stem plus .png, with -2, -3, ... after a name already taken."""
    names: dict[str, None] = {}  # a dict: ordered, and fast to look up
    for path in paths:
        stem = path.stem if safe_name(f"{path.stem}.png") else "image"
        name, k = f"{stem}.png", 1
        while name in names:
            k += 1
            name = f"{stem}-{k}.png"
        names[name] = None
    return list(names)


def read_array_range(spec: str, channels: int, size: tuple[int, int]) -> np.ndarray:
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


def parse_labels(text: str | None, count: int) -> torch.Tensor | None:
    """--labels: one class per image, comma-separated, or one for all; -1 for none."""
    if text is None:
        return None
    try:
        labels = [int(k) for k in text.split(",")]
    except ValueError:
        raise CLIError(f"--labels {text!r}: expected integers separated by commas") from None
    labels = labels * count if len(labels) == 1 else labels
    if len(labels) != count:
        raise CLIError(f"--labels: {len(labels)} classes for {count} images; give one per "
                       "image, or one for all")
    return torch.tensor(labels)


def main(argv: list[str] | None = None) -> int:
    parser = codec_parser(__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGES",
                        help="PNG/JPEG files, folders of them, or PATH.npy[:START:STOP]")
    parser.add_argument("-o", "--out", required=True, help="the .axc file to write")
    parser.add_argument("--labels",
                        help="a class-conditional model's classes of the images: one per "
                        "image, comma-separated, or one for all (-1: no class)")
    return run_command(compress_files, parser.parse_args(argv))


def compress_files(args: argparse.Namespace) -> int:
    from ..codec.coder import compress
    from ..codec.format import unpack

    out = Path(args.out)
    if out.suffix != ".axc":
        raise CLIError(f"-o {out}: expected a .axc file")
    check_output(out, "-o")
    model = load_model(args)
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
    write_outputs({out: lambda tmp: tmp.write_bytes(data)})
    print(f"wrote {out}")
    return 0
