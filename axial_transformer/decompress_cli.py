"""Decompress an .axc file written by compress.py: the images come back bit for bit.

    python decompress.py photos.axc --checkpoint runs/demo --out photos/     # one PNG per image
    python decompress.py test.axc --checkpoint runs/demo --out test.npy      # uint8 [N, H, W, C]

--checkpoint must hold the model that compressed the file (a run directory, one of its
checkpoints or an export directory), and the model runs on the kind of device it ran on then.
Images go to --out as 00000.png, 00001.png, ... in the order they were compressed, or into one
.npy array. A file of another format or model, a damaged or truncated one, or pixels that do not
decode exactly stop with one line on stderr and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
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


def write_images(images: torch.Tensor, out: Path) -> None:
    """uint8 [N, C, H, W] -> out.npy as [N, H, W, C], or one PNG per image in the folder `out`;
    each file written atomically."""
    from PIL import Image

    from .io import atomic_write

    pixels = images.permute(0, 2, 3, 1).numpy()
    if out.suffix == ".npy":
        def write_array(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # np.save would append .npy to a temporary name
                np.save(f, pixels, allow_pickle=False)

        atomic_write(out, write_array)
        return
    digits = max(5, len(str(len(pixels) - 1)))
    for k, image in enumerate(pixels):
        png = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        atomic_write(out / f"{k:0{digits}d}.png", lambda tmp, png=png: png.save(tmp, "PNG"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the .axc file to decompress")
    add_common_arguments(parser)
    parser.add_argument("--out", required=True,
                        help="a folder for one PNG per image, or FILE.npy for uint8 [N, H, W, C]")
    parser.add_argument("--device",
                        help="where the model runs (default: the kind of device the file was "
                        "compressed on, which decoding needs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: decompress_file(args), args.debug)


def decompress_file(args: argparse.Namespace) -> int:
    from .codec import decompress
    from .codec_format import unpack

    source, out = Path(args.file), Path(args.out)
    if not source.is_file():
        raise CLIError(f"{source} not found")
    if out.suffix != ".npy" and out.is_file():
        raise CLIError(f"--out {out}: an existing file; expected a folder for PNGs or a .npy")
    data = source.read_bytes()
    try:
        header, _ = unpack(data)  # another format or a damaged file, before loading any model
    except ValueError as e:
        raise CLIError(f"{source}: {e}") from None
    n, c, h, w = header.shape
    if out.suffix != ".npy" and c not in (1, 2, 3, 4):
        raise CLIError(f"--out {out}: PNGs hold 1 to 4 channels, these images have {c}; "
                       "write a .npy instead")
    model = load_model(args.checkpoint, args.device or header.settings["device"])
    start = time.perf_counter()
    try:
        images = decompress(model, data, progress=True)
    except ValueError as e:  # another model, or pixels that do not decode exactly
        raise CLIError(f"{source}: {e}") from None
    seconds = time.perf_counter() - start
    write_images(images, out)
    print(f"{source}: {n} images of {c}x{h}x{w}, {8 * len(data) / images.numel():.3f} bits/dim "
          f"-> {out} ({n / seconds:.1f} images/s)")
    return 0
