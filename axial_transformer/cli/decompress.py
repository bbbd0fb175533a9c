"""Decompress an .axc file written by compress.py: the images come back bit for bit.

    python decompress.py photos.axc --checkpoint runs/demo --out photos/     # one PNG per image
    python decompress.py test.axc --checkpoint runs/demo --out test.npy      # uint8 [N, H, W, C]

--checkpoint must hold the model that compressed the file; any machine decodes it, on the CPU or
a CUDA GPU, at any --batch-size and thread count. The PNGs take the names they were compressed
from, else 00000.png, 00001.png, ... The folder is written whole or not at all, replacing an
earlier output of decompress.py; any other folder is refused unless empty.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import (
    CLIError,
    check_output,
    codec_parser,
    load_model,
    run_command,
    save_npy,
    save_pngs,
    write_outputs,
)

# Marks a folder of PNGs that decompress.py wrote, which a later output may replace.
MARKER = ".decompressed"


def main(argv: list[str] | None = None) -> int:
    parser = codec_parser(__doc__)
    parser.add_argument("file", help="the .axc file to decompress")
    parser.add_argument("--out", required=True,
                        help="a folder for one PNG per image, or FILE.npy for uint8 [N, H, W, C]")
    return run_command(decompress_file, parser.parse_args(argv))


def decompress_file(args: argparse.Namespace) -> int:
    from ..codec.coder import decompress
    from ..codec.format import NAMES, unpack

    source, out = Path(args.file), Path(args.out)
    if not source.is_file():
        raise CLIError(f"{source} not found")
    pngs = out.suffix != ".npy"
    check_output(out, "--out", folder=pngs)
    if pngs and out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CLIError(f"--out {out}: a folder that decompress.py did not write; give a new or "
                       "empty folder (an earlier output of decompress.py is replaced)")
    data = source.read_bytes()
    try:
        header, _ = unpack(data)  # another format or a damaged file, before loading any model
    except ValueError as e:
        raise CLIError(f"{source}: {e}") from None
    n, c, h, w = header.shape
    if pngs and c not in (1, 2, 3, 4):
        raise CLIError(f"--out {out}: PNGs hold 1 to 4 channels, these images have {c}; "
                       "write a .npy instead")
    model = load_model(args)
    start = time.perf_counter()
    try:
        images = decompress(model, data, args.batch_size, args.threads, progress=True)
    except ValueError as e:  # another model, or pixels that do not decode exactly
        raise CLIError(f"{source}: {e}") from None
    seconds = time.perf_counter() - start
    print(f"{source}: {n} images of {c}x{h}x{w}, {8 * len(data) / images.numel():.3f} bits/dim "
          f"({n / seconds:.1f} images/s)", flush=True)
    pixels = images.permute(0, 2, 3, 1).numpy()

    def write_folder(folder: Path) -> None:
        save_pngs(folder, pixels, header.settings.get(NAMES))
        (folder / MARKER).write_text("PNGs written by decompress.py\n")

    write_outputs({out: write_folder if pngs else lambda tmp: save_npy(tmp, pixels)},
                  folders=(out,) * pngs)
    print(f"wrote {out}")
    return 0
