"""`python -m axial_transformer.data prepare SOURCE OUT`: convert image data (or clips, with
`--frames T`) once into the uint8 .npy arrays that training memory-maps (docs/data.md)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from .clips import BUILTIN_CLIPS, VIDEO_SUFFIXES
from .labels import labels_path, load_class_names
from .prepare import prepare, prepare_holdout
from .sources import FORMATS, SPLITS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m axial_transformer.data", description=(
        "Convert image data into the uint8 .npy arrays that training memory-maps."))
    cmd = parser.add_subparsers(dest="command", required=True).add_parser(
        "prepare", help="convert SOURCE into OUT.npy [N, H, W, C]", description=(
            "Convert SOURCE (a tar or folder of PNG/JPEG images, npz batches, CIFAR-10, MNIST, or "
            "a .npy) into a uint8 OUT.npy [N, H, W, C], with OUT_labels.npy and "
            "OUT_classes.json where the source has class labels; or clips (a folder of "
            f"{'/'.join(s.lstrip('.').upper() for s in VIDEO_SUFFIXES)} files, a .npy "
            f"[N, T, H, W, C], or {BUILTIN_CLIPS}) into OUT.npy [N, T, H, W, C]."))
    cmd.add_argument("source", help="file or directory to read")
    cmd.add_argument("out", help="the .npy file to write (a directory with --holdout)")
    cmd.add_argument("--format", default="auto", choices=("auto", *FORMATS, "videos"))
    cmd.add_argument("--split", default="train", choices=SPLITS,
                     help="which split of a multi-split source (CIFAR-10, MNIST, npz folder)")
    cmd.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                     help="required size (default: the size of the first image)")
    cmd.add_argument("--resize", action="store_true",
                     help="box-resize images to --image-size instead of refusing other sizes")
    cmd.add_argument("--channels", type=int, help=f"3 (RGB, the default) or 1 (grayscale, the "
                     f"default of {BUILTIN_CLIPS})")
    cmd.add_argument("--frames", type=int, metavar="T",
                     help="prepare clips of T frames: the first T of each video file (a shorter "
                     "one is skipped with a warning) or of each clip of a .npy")
    cmd.add_argument("--count", type=int, metavar="N",
                     help=f"clips of {BUILTIN_CLIPS} to make (default 4096 train, 512 test)")
    cmd.add_argument("--on-error", default="skip", choices=("skip", "raise"),
                     help="what to do with an image file that cannot be decoded")
    cmd.add_argument("--skip-damaged", action="store_true",
                     help="of a damaged archive (truncated or corrupted tar, .tar.gz, ...), "
                     "prepare the images before the break instead of stopping")
    cmd.add_argument("--holdout", type=float, metavar="FRACTION",
                     help="hold out this fraction of the images, the same ones on every run, "
                     "as a test split: OUT is then a directory that gets train.npy and test.npy")
    options = vars(parser.parse_args(argv))
    source, out, holdout = (options.pop(key) for key in ("source", "out", "holdout"))
    del options["command"]

    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    out = Path(out)
    outputs = [out] if holdout is None else [out / "train.npy", out / "test.npy"]
    try:
        counts = ([prepare(source, out, **options)] if holdout is None
                  else prepare_holdout(source, out, holdout, **options))
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        parser.exit(2, f"error: {e}\n")
    for out, count in zip(outputs, counts, strict=True):
        names = load_class_names(out)
        labels = (f", with their labels ({len(names)} classes) in {labels_path(out).name}"
                  if names is not None else "")
        shape = list(np.load(out, mmap_mode="r", allow_pickle=False).shape[1:])
        what = "clips of [T, H, W, C]" if len(shape) == 4 else "images of [H, W, C]"
        print(f"wrote {count:,} {what} = {shape} to {out}{labels}")


if __name__ == "__main__":
    main()
