"""`prepare`: convert a source once into the uint8 .npy [N, H, W, C] that training memory-maps.

A split `X.npy` of a source with class labels also gets `X_labels.npy` and `X_classes.json`
(labels.py). Every file is first written to a temporary file beside it, and all of them are
renamed into place only once every one is complete: a failed run leaves the previous outputs as
they were, and the temporary files of a killed run are removed by the next run.
"""

from __future__ import annotations

import glob
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .sources import Source, open_source
from .image_files import CorruptImageError, decode_image
from ..files import atomic_write
from .labels import classes_path, labels_path
from .npy_rows import RowWriter, set_npy_length

COMPACT_CHUNK = 4096  # rows moved at a time when closing gaps or copying held-out images
HOLDOUT_SEED = 0


def decode_to(data: bytes, name: str, channels: int) -> np.ndarray:
    """Decode an image file to uint8 [H, W, C], converted to RGB (C = 3) or grayscale (C = 1)
    the way torchvision's ImageFolder does."""
    if channels not in (1, 3):
        raise ValueError(f"image files decode to 1 (grayscale) or 3 (RGB) channels, not {channels}")
    pixels = decode_image(data, name, "RGB" if channels == 3 else "L")
    return pixels.reshape(*pixels.shape[:2], channels)


def resize_box(image: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Resize [H, W, C] with a box filter (area average), as van den Oord et al. and Chrabaszcz
    et al. downsampled ImageNet; the aspect ratio is not kept."""
    h, w = image_size
    planes = [Image.fromarray(image[..., c]).resize((w, h), Image.Resampling.BOX)
              for c in range(image.shape[2])]
    return np.stack([np.asarray(p) for p in planes], axis=-1)


def to_image(
    payload: bytes | np.ndarray | CorruptImageError,
    name: str,
    channels: int,
    image_size: tuple[int, int] | None,
    resize: bool,
) -> np.ndarray:
    if isinstance(payload, CorruptImageError):  # refused by its size before it was read
        raise payload
    image = decode_to(payload, name, channels) if isinstance(payload, bytes) else payload
    if image.shape[2] != channels:
        c = image.shape[2]
        raise ValueError(f"{name}: has {c} channels, expected {channels} (pass --channels {c})")
    if image_size is not None and image.shape[:2] != image_size:
        if not resize:
            raise ValueError(
                f"{name}: is {image.shape[0]}x{image.shape[1]}, expected "
                f"{image_size[0]}x{image_size[1]}; pass --resize to resize"
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
    name: str,
) -> tuple[np.ndarray, list[str]]:
    """Decode every record into a .npy at `path` (to become `name`) with a row for each record;
    returns which rows were written (bool [count]) and the messages of the images skipped.

    The file is created at the first image, whose size (unless given) sets everyone's."""
    out, first, skipped = None, None, []
    written = np.zeros(source.count, dtype=bool)
    bar = tqdm(source.records, total=source.count, unit="img", disable=not progress,
               desc=f"{source.format} {source.path.name}")
    try:
        for index, image_name, payload in bar:
            try:
                image = to_image(payload, image_name, channels, image_size, resize)
            except CorruptImageError as e:
                if on_error == "raise":
                    raise
                skipped.append(str(e))
                continue
            if out is None:
                first = image_name
                out = RowWriter(path, source.count, image.shape, name)
            elif image.shape != out.row_shape:
                raise ValueError(
                    f"{image_name}: is {'x'.join(map(str, image.shape))} (HxWxC) but {first} "
                    f"is {'x'.join(map(str, out.row_shape))}; pass --image-size H W and --resize "
                    f"to resize them all"
                )
            out.write(index, image[None])
            written[index] = True
    finally:
        if out is not None:
            out.close()
    if out is None:
        raise ValueError(f"{source.path}: no image could be read ({len(skipped)} skipped)")
    return written, skipped


def keep_rows(path: Path, rows: np.ndarray, name: str) -> None:
    """Keep only `rows` (increasing) of the uint8 .npy at `path`, in order, and shrink the file."""
    images = np.load(path, mmap_mode="r", allow_pickle=False)  # read only: see npy_rows.py
    out = RowWriter(path, len(images), images.shape[1:], name, create=False)
    try:
        for start in range(0, len(rows), COMPACT_CHUNK):  # rows[i] >= i: rows only move to 0
            out.write(start, images[rows[start : start + COMPACT_CHUNK]])
    finally:
        out.close()
    row_shape, offset = images.shape[1:], images.offset
    del images  # unmap before the file is shrunk
    set_npy_length(path, len(rows), row_shape, offset)


def copy_rows(source: Path, rows: np.ndarray, path: Path, name: str) -> None:
    """Write `rows` of the uint8 .npy at `source` to a new .npy at `path`."""
    images = np.load(source, mmap_mode="r", allow_pickle=False)
    out = RowWriter(path, len(rows), images.shape[1:], name)
    try:
        for start in range(0, len(rows), COMPACT_CHUNK):
            out.write(start, images[rows[start : start + COMPACT_CHUNK]])
    finally:
        out.close()


def holdout_mask(count: int, fraction: float) -> np.ndarray:
    """Which of `count` images (in the source's order) are held out: round(fraction * count)
    of them, drawn with a fixed seed, so the same input always gives the same split."""
    held = math.floor(fraction * count + 0.5)
    if not 0 < held < count:
        raise ValueError(f"--holdout {fraction} of {count} images would leave {held} for test "
                         f"and {count - held} for training; both need at least one")
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(HOLDOUT_SEED).permutation(count)[:held]] = True
    return mask


def split_files(images: Path, labelled: bool) -> list[Path]:
    """The files of one prepared split."""
    return [images, labels_path(images), classes_path(images)] if labelled else [images]


def atomic_write_all(paths: list[Path], write: Callable[[list[Path]], None]) -> None:
    """`atomic_write` for several files: `write` fills one temporary file per path, and only
    once it has returned are they renamed into place, the last path first."""
    if not paths:
        write([])
        return
    atomic_write(paths[0],
                 lambda tmp: atomic_write_all(paths[1:], lambda tmps: write([tmp, *tmps])))


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary files that killed runs left beside `path`. `atomic_write` names them
    `.NAME.XXXXXXXX.tmp` (mkstemp's eight random characters); a run still writing the same output
    would lose its file too, so two runs must not prepare one output at once."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"):
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        warnings.warn(f"removed {tmp} ({size:,} bytes), left by an earlier run that was killed",
                      stacklevel=4)


def check_options(
    image_size: tuple[int, int] | None, channels: int, on_error: str, resize: bool
) -> tuple[int, int] | None:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"--image-size must be two positive numbers H W, got {image_size}")
    if resize and image_size is None:
        raise ValueError("--resize needs --image-size H W to resize to")
    if channels < 1:
        raise ValueError(f"--channels must be positive, got {channels}")
    return image_size


def open_checked(source: str | Path, format: str, split: str, skip_damaged: bool) -> Source:
    """`open_source`, its caveats shown; a damaged archive stops here unless `skip_damaged`."""
    src = open_source(source, format, split)
    if src.note:
        warnings.warn(src.note, stacklevel=3)
    if src.damage is not None:
        if not skip_damaged:
            raise ValueError(f"{src.damage}; pass skip_damaged=True (--skip-damaged) to prepare "
                             f"those alone")
        warnings.warn(f"{src.damage}; skipped {src.damaged} damaged image member(s) there, and "
                      f"whatever followed them", stacklevel=3)
    return src


def write_splits(
    source: Source, outputs: list[Path], holdout: float, **options
) -> list[int]:
    """Decode `source` once into outputs[0], or with `holdout` into outputs = [train, test];
    returns the number of images of each."""
    labelled = source.labels is not None
    files = [file for out in outputs for file in split_files(out, labelled)]
    for out in outputs:
        for file in split_files(out, labelled=True):
            remove_stale_temps(file)
    counts, skipped = [], []

    def write(tmps: list[Path]) -> None:
        tmp = dict(zip(files, tmps, strict=True))
        written, skips = write_images(source, tmp[outputs[0]], **options, name=str(outputs[0]))
        skipped.extend(skips)
        kept = np.flatnonzero(written)
        if holdout:
            held = holdout_mask(len(kept), holdout)
            rows = {outputs[0]: kept[~held], outputs[1]: kept[held]}
            # before keep_rows
            copy_rows(tmp[outputs[0]], rows[outputs[1]], tmp[outputs[1]], str(outputs[1]))
        else:
            rows = {outputs[0]: kept}
        if len(rows[outputs[0]]) < source.count:
            keep_rows(tmp[outputs[0]], rows[outputs[0]], str(outputs[0]))
        for out, split_rows in rows.items():
            counts.append(len(split_rows))
            if labelled:
                with open(tmp[labels_path(out)], "wb") as f:
                    np.save(f, source.labels[split_rows], allow_pickle=False)
                tmp[classes_path(out)].write_text(json.dumps(source.classes) + "\n",
                                                  encoding="utf-8")
            else:  # labels of an earlier run would now belong to other images
                labels_path(out).unlink(missing_ok=True)
                classes_path(out).unlink(missing_ok=True)

    atomic_write_all(files, write)
    if skipped:
        shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {shown}", stacklevel=3)
    if source.expected_count is not None and sum(counts) != source.expected_count:
        warnings.warn(
            f"{source.path.name} should hold {source.expected_count:,} images (van den Oord et "
            f"al.), but {sum(counts):,} were written: the copy may be incomplete or damaged",
            stacklevel=3,
        )
    return counts


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
    skip_damaged: bool = False,
    progress: bool = True,
) -> int:
    """Convert one split of `source` into a uint8 .npy [N, H, W, C] at `out_path`; returns N.

    Images must all be `image_size` (or, if None, the size of the first one); a different size
    is an error naming the file, unless `resize=True` box-resizes everything to `image_size`.
    Image files are converted to RGB or grayscale to match `channels`; array sources must
    already have `channels` channels. Undecodable image files are skipped with a warning
    (`on_error="skip"`) or stop the run (`"raise"`). Where the source has class labels they are
    written beside the images (`OUT_labels.npy`, `OUT_classes.json`), in the same order, also
    when images are skipped. An image file larger than 128 MiB, or declaring more than 32 Mi
    pixels, is refused before it is read or decoded, like an undecodable one. A damaged archive
    (a truncated or corrupted tar, .tar.gz, .tar.bz2, .tar.xz) is an error naming the member
    where it broke, unless `skip_damaged=True`: then the image members before the break are
    prepared, with a warning that says how many were skipped there. The outputs appear
    atomically: a failed run (a full disk included) leaves no partial file.
    """
    image_size = check_options(image_size, channels, on_error, resize)
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise ValueError(f"{out_path}: the output must be a .npy file")
    src = open_checked(source, format, split, skip_damaged)
    return write_splits(src, [out_path], 0.0, image_size=image_size, channels=channels,
                        resize=resize, on_error=on_error, progress=progress)[0]


def prepare_holdout(
    source: str | Path,
    out_dir: str | Path,
    fraction: float,
    *,
    format: str = "auto",
    split: str = "train",
    image_size: tuple[int, int] | None = None,
    channels: int = 3,
    on_error: str = "skip",
    resize: bool = False,
    skip_damaged: bool = False,
    progress: bool = True,
) -> tuple[int, int]:
    """Like `prepare`, but holds out `fraction` of the images as a test split: writes
    `out_dir/train.npy` and `out_dir/test.npy` (each with its labels, where the source has them)
    and returns their sizes.

    The test split is round(fraction * N) of the N images, drawn with a fixed seed from the
    source's own order (sorted file names, or array order), so the same input always gives the
    same split, whatever order the file system lists the files in. Both splits keep that order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must be a fraction between 0 and 1, got {fraction}")
    image_size = check_options(image_size, channels, on_error, resize)
    out_dir = Path(out_dir)
    if out_dir.suffix == ".npy":
        raise ValueError(f"{out_dir}: with a hold-out the output is a directory, which gets "
                         f"train.npy and test.npy")
    src = open_checked(source, format, split, skip_damaged)
    train, test = write_splits(src, [out_dir / "train.npy", out_dir / "test.npy"], fraction,
                               image_size=image_size, channels=channels, resize=resize,
                               on_error=on_error, progress=progress)
    return train, test
