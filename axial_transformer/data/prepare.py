"""`prepare`: convert a source once into the uint8 .npy [N, H, W, C] (clips: [N, T, H, W, C])
that training memory-maps, with `X_labels.npy` and `X_classes.json` beside `X.npy` where the
source has labels. Each output is written to a temporary file, and all are renamed into place
only once every one is complete: a failed run leaves the previous outputs as they were."""

from __future__ import annotations

import glob
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import atomic_write
from .clips import BUILTIN_CLIPS, decode_clip, is_clip_source, open_clip_source
from .image_files import CorruptImageError, decode_image, resize_box
from .labels import classes_path, labels_path
from .npy_rows import RowWriter
from .sources import Source, open_source

COMPACT_CHUNK = 4096  # rows moved at a time when closing gaps or copying held-out images
HOLDOUT_SEED = 0
# van den Oord et al. 2016 downsampled ImageNet, the data of the paper's ImageNet-32/64 numbers.
VAN_DEN_OORD_NAME = re.compile(r"^(train|valid)_(32x32|64x64)(\.tar)?$")
VAN_DEN_OORD_COUNTS = {"train": 1_281_149, "valid": 49_999}


def prepare(source: str | Path, out_path: str | Path, **options) -> int:
    """Convert one split of `source` into a uint8 .npy [N, H, W, C] at `out_path`, with its
    labels beside it where the source has them; returns N. The options are `convert`'s."""
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise ValueError(f"{out_path}: the output must be a .npy file")
    return convert(source, [out_path], 0.0, **options)[0]


def prepare_holdout(source: str | Path, out_dir: str | Path, fraction: float,
                    **options) -> tuple[int, int]:
    """`prepare` (the same options) into `out_dir/train.npy` and `out_dir/test.npy`, the test
    split round(fraction * N) of the N images, drawn with a fixed seed from the source's own
    order (sorted file names, or array order), so the same input always gives the same split,
    whatever order the file system lists the files in; returns the two sizes."""
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must be a fraction between 0 and 1, got {fraction}")
    out_dir = Path(out_dir)
    if out_dir.suffix == ".npy":
        raise ValueError(f"{out_dir}: with a hold-out the output is a directory, which gets "
                         f"train.npy and test.npy")
    train, test = convert(source, [out_dir / "train.npy", out_dir / "test.npy"], fraction,
                          **options)
    return train, test


def convert(
    source: str | Path, outputs: list[Path], holdout: float, *, format: str = "auto",
    split: str = "train", image_size: tuple[int, int] | None = None, channels: int | None = None,
    on_error: str = "skip", resize: bool = False, skip_damaged: bool = False,
    progress: bool = True, frames: int | None = None, count: int | None = None,
) -> list[int]:
    """Decode `source` once into outputs[0], or with `holdout` into outputs = [train, test];
    returns the number of images of each (docs/data.md). Every image must be `image_size` (None:
    the first one's size), or with `resize` is box-resized to it; image files are converted to
    RGB (`channels` 3) or grayscale (1); an image file that cannot be decoded or is too large is
    skipped with a warning (`on_error` "skip") or stops the run ("raise"); a damaged archive
    stops it unless `skip_damaged`, which prepares the images before the break. Clips (with
    `frames`, or from a clip source: clips.py) keep their first `frames` frames, each resized
    frame by frame, and a video file with fewer frames is skipped like an undecodable one;
    `count` is the number of moving digits to make. `channels` None is 1 for the grayscale
    moving digits and 3 otherwise."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"--image-size must be two positive numbers H W, got {image_size}")
    if resize and image_size is None:
        raise ValueError("--resize needs --image-size H W to resize to")
    clips = is_clip_source(Path(source), format, frames)
    if channels is None:
        channels = 1 if str(source) == BUILTIN_CLIPS else 3
    if clips:
        if holdout and str(source) == BUILTIN_CLIPS:
            raise ValueError(f"{BUILTIN_CLIPS} has its own test split, of digits never seen in "
                             f"training: prepare it with --split test instead of --holdout")
        src, frames = open_clip_source(source, format, split, frames, image_size, count)
    elif count is not None:
        raise ValueError(f"--count is for {BUILTIN_CLIPS}; {source} holds the images it holds")
    else:
        src = open_source(source, format, split)
    if src.damage and not skip_damaged:
        raise ValueError(f"{src.damage}; pass skip_damaged=True (--skip-damaged) to prepare "
                         f"those alone")
    if src.note:
        warnings.warn(src.note, stacklevel=3)

    every = [file for out in outputs for file in (out, labels_path(out), classes_path(out))]
    files = every if src.labels is not None else outputs
    # The temporary files (atomic_write's `.NAME.XXXXXXXX.tmp`) of runs that were killed; a run
    # still writing the same output would lose its file too: two must not prepare one at once.
    for file in every:
        for tmp in file.parent.glob(f".{glob.escape(file.name)}.{'?' * 8}.tmp"):
            size = tmp.stat().st_size
            tmp.unlink(missing_ok=True)
            warnings.warn(f"removed {tmp} ({size:,} bytes), left by an earlier run that was "
                          f"killed", stacklevel=3)
    counts, skipped, unit = [], [], "clip" if clips else "image"

    def write(tmps: list[Path]) -> None:
        tmp = dict(zip(files, tmps, strict=True))
        kept = write_images(src, tmp[outputs[0]], str(outputs[0]), skipped, channels,
                            image_size, resize, on_error, progress, frames if clips else None)
        rows = {outputs[0]: kept}
        if holdout:  # round(holdout * N) images, drawn with a fixed seed
            held = math.floor(holdout * len(kept) + 0.5)
            if not 0 < held < len(kept):
                raise ValueError(f"--holdout {holdout} of {len(kept)} {unit}s would leave {held} "
                                 f"for test and {len(kept) - held} for training; both need at "
                                 f"least one")
            test = np.zeros(len(kept), dtype=bool)
            test[np.random.default_rng(HOLDOUT_SEED).permutation(len(kept))[:held]] = True
            rows = {outputs[0]: kept[~test], outputs[1]: kept[test]}
            copy_rows(tmp[outputs[0]], rows[outputs[1]], tmp[outputs[1]], str(outputs[1]))
        if len(rows[outputs[0]]) < src.count:  # after the copy: this moves rows in place
            copy_rows(tmp[outputs[0]], rows[outputs[0]], tmp[outputs[0]], str(outputs[0]))
        for out, split_rows in rows.items():
            counts.append(len(split_rows))
            if src.labels is not None:
                with open(tmp[labels_path(out)], "wb") as f:
                    np.save(f, src.labels[split_rows], allow_pickle=False)
                tmp[classes_path(out)].write_text(json.dumps(src.classes) + "\n",
                                                  encoding="utf-8")
            else:  # labels of an earlier run would now belong to other images
                labels_path(out).unlink(missing_ok=True)
                classes_path(out).unlink(missing_ok=True)

    atomic_write_all(files, write)
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        unreadable = (f"clip(s) unreadable or shorter than {frames} frames" if clips
                      else "unreadable image(s)")
        warnings.warn(f"skipped {len(skipped)} {unreadable}: {shown}", stacklevel=3)
    paper = VAN_DEN_OORD_NAME.match(src.path.name)  # a tar or folder of the paper's data
    if paper and sum(counts) != VAN_DEN_OORD_COUNTS[paper[1]]:
        warnings.warn(f"{src.path.name} should hold {VAN_DEN_OORD_COUNTS[paper[1]]:,} images (van "
                      f"den Oord et al.), but {sum(counts):,} were written: the copy may be "
                      f"incomplete or damaged", stacklevel=3)
    return counts


def write_images(
    src: Source, path: Path, name: str, skipped: list[str], channels: int,
    image_size: tuple[int, int] | None, resize: bool, on_error: str, progress: bool,
    frames: int | None = None,
) -> np.ndarray:
    """Decode every record into a .npy at `path` (to become `name`) with a row for each record,
    created at the first image, whose size (unless given) sets everyone's; returns the rows
    written, in order, and adds the messages of the images skipped to `skipped`. With `frames`
    the records are clips [T, H, W, C] (or video files), resized frame by frame."""
    out, first = None, None
    unit, axes = ("img", "HxWxC") if frames is None else ("clip", "TxHxWxC")
    written = np.zeros(src.count, dtype=bool)
    try:
        for index, image_name, image in tqdm(src.records, total=src.count, unit=unit,
                                             disable=not progress,
                                             desc=f"{src.format} {src.path.name}"):
            try:
                if isinstance(image, CorruptImageError):  # refused by its size, not read
                    raise image
                if not isinstance(image, np.ndarray):  # a file: converted as ImageFolder does
                    if channels not in (1, 3):
                        raise ValueError(f"image files decode to 1 (grayscale) or 3 (RGB) "
                                         f"channels, not {channels}")
                    mode = "RGB" if channels == 3 else "L"
                    image = (decode_image(image, image_name, mode) if frames is None
                             else decode_clip(image, image_name, mode, frames))
            except CorruptImageError as e:
                if on_error == "raise":
                    raise
                skipped.append(str(e))
                continue
            if image.shape[-1] != channels:
                raise ValueError(f"{image_name}: has {image.shape[-1]} channels, expected "
                                 f"{channels} (pass --channels {image.shape[-1]})")
            if image_size is not None and image.shape[-3:-1] != image_size:
                if not resize:
                    raise ValueError(f"{image_name}: is {image.shape[-3]}x{image.shape[-2]}, "
                                     f"expected {image_size[0]}x{image_size[1]}; pass --resize "
                                     f"to resize")
                image = (resize_box(image, image_size) if frames is None
                         else np.stack([resize_box(frame, image_size) for frame in image]))
            if out is None:
                first, out = image_name, RowWriter(path, src.count, image.shape, name)
            elif image.shape != out.row_shape:
                raise ValueError(f"{image_name}: is {'x'.join(map(str, image.shape))} ({axes}) "
                                 f"but {first} is {'x'.join(map(str, out.row_shape))}; pass "
                                 f"--image-size H W and --resize to resize them all")
            out.write(index, image[None])
            written[index] = True
    finally:
        if out is not None:
            out.close()
    if out is None:
        what = "image" if frames is None else f"clip of {frames} frames"
        raise ValueError(f"{src.path}: no {what} could be read ({len(skipped)} skipped)")
    return np.flatnonzero(written)


def copy_rows(source: Path, rows: np.ndarray, path: Path, name: str) -> None:
    """Write `rows` (increasing) of the uint8 .npy at `source` as a new .npy at `path`, or, when
    `path` is `source`, keep only those rows there (each moves towards the start: rows[i] >= i)."""
    images = np.load(source, mmap_mode="r", allow_pickle=False)  # read only: see npy_rows.py
    in_place = path == source
    out = RowWriter(path, len(images) if in_place else len(rows), images.shape[1:], name,
                    create=not in_place)
    try:
        for start in range(0, len(rows), COMPACT_CHUNK):
            out.write(start, images[rows[start : start + COMPACT_CHUNK]])
        del images  # unmapped before the file is shrunk
        if in_place:
            out.truncate(len(rows))
    finally:
        out.close()


def atomic_write_all(paths: list[Path], write: Callable[[list[Path]], None]) -> None:
    """`atomic_write` for several files: `write` fills one temporary file per path, and only
    once it has returned are they renamed into place."""
    if not paths:
        return write([])
    atomic_write(paths[0],
                 lambda tmp: atomic_write_all(paths[1:], lambda tmps: write([tmp, *tmps])))
