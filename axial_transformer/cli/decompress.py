"""Decompress an .axc file written by compress.py: the images come back bit for bit.

    python decompress.py photos.axc --checkpoint runs/demo --out photos/     # one PNG per image
    python decompress.py test.axc --checkpoint runs/demo --out test.npy      # uint8 [N, H, W, C]

--checkpoint must hold the model that compressed the file (a run directory, one of its
checkpoints or an export directory); any machine decodes it, on the CPU or a CUDA GPU, at any
--batch-size and thread count. Images go to --out under the names they were compressed from
(when compress.py read them from files), otherwise as 00000.png, 00001.png, ... in the order
they were compressed, or into one .npy array. The folder is written whole or not at all: the
PNGs go into a temporary folder that then replaces --out, so no file of an earlier output stays
beside them; a folder that decompress.py did not write is refused unless empty. A file of
another format or model, a damaged or truncated one, or pixels that do not decode exactly stop
with one line on stderr and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import (
    CLIError,
    add_common_arguments,
    add_compute_arguments,
    check_writable_file,
    load_model,
    run_reporting_errors,
    write_output,
)

# Marks a folder of PNGs that decompress.py wrote, which a later output may replace.
MARKER = ".decompressed"


def write_images(images: torch.Tensor, out: Path, names: list[str] | None) -> None:
    """uint8 [N, C, H, W] -> out.npy as [N, H, W, C], or one PNG per image in the folder `out`
    (named `names`, or 00000.png, 00001.png, ...), the whole set at once."""
    pixels = images.permute(0, 2, 3, 1).numpy()
    if out.suffix == ".npy":
        def write_array(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # np.save would append .npy to a temporary name
                np.save(f, pixels, allow_pickle=False)

        write_output(out, write_array)
        return
    if names is None:
        digits = max(5, len(str(len(pixels) - 1)))
        names = [f"{k:0{digits}d}.png" for k in range(len(pixels))]
    try:
        replace_folder(out, lambda tmp: write_pngs(pixels, tmp, names))
    except OSError as e:
        raise CLIError(f"could not write {out}: {e.strerror or e}; nothing was written "
                       "there") from None


def write_pngs(pixels: np.ndarray, folder: Path, names: list[str]) -> None:
    from PIL import Image

    for image, name in zip(pixels, names, strict=True):
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / name,
                                                                               "PNG")
    (folder / MARKER).write_text("PNGs written by decompress.py\n")


def replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a new temporary folder beside `out`, then put it in `out`'s place:
    a reader sees the old folder or the new one, never a mix or part of one."""
    from ..files import fsync_directory, umask_mode

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        fsync_directory(out.parent)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # the earlier output back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_out_folder(out: Path) -> None:
    """Before any compute: --out must be new, empty, or a folder that decompress.py wrote."""
    if out.is_file():
        raise CLIError(f"--out {out}: an existing file; expected a folder for PNGs or a .npy")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CLIError(f"--out {out}: a folder that decompress.py did not write; give a new or "
                       "empty folder (an earlier output of decompress.py is replaced)")
    check_writable_file(out, "--out", folder=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the .axc file to decompress")
    add_common_arguments(parser)
    parser.add_argument("--out", required=True,
                        help="a folder for one PNG per image, or FILE.npy for uint8 [N, H, W, C]")
    add_compute_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: decompress_file(args), args.debug)


def decompress_file(args: argparse.Namespace) -> int:
    from ..codec.coder import decompress
    from ..codec.format import NAMES, unpack

    source, out = Path(args.file), Path(args.out)
    if not source.is_file():
        raise CLIError(f"{source} not found")
    for name, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise CLIError(f"{name} must be at least 1, got {value}")
    if out.suffix == ".npy":
        check_writable_file(out, "--out", folder=True)
    else:
        check_out_folder(out)
    data = source.read_bytes()
    try:
        header, _ = unpack(data)  # another format or a damaged file, before loading any model
    except ValueError as e:
        raise CLIError(f"{source}: {e}") from None
    n, c, h, w = header.shape
    if out.suffix != ".npy" and c not in (1, 2, 3, 4):
        raise CLIError(f"--out {out}: PNGs hold 1 to 4 channels, these images have {c}; "
                       "write a .npy instead")
    model = load_model(args.checkpoint, args.device)
    start = time.perf_counter()
    try:
        images = decompress(model, data, args.batch_size, args.threads, progress=True)
    except ValueError as e:  # another model, or pixels that do not decode exactly
        raise CLIError(f"{source}: {e}") from None
    seconds = time.perf_counter() - start
    print(f"{source}: {n} images of {c}x{h}x{w}, {8 * len(data) / images.numel():.3f} bits/dim "
          f"({n / seconds:.1f} images/s)", flush=True)
    write_images(images, out, header.settings.get(NAMES))
    print(f"wrote {out}")
    return 0
