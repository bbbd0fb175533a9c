"""Prepared splits (uint8 .npy [N, H, W, C] of images or [N, T, H, W, C] of clips, docs/data.md)
as datasets for training and evaluation. Pixels stay uint8 0..255 end to end: the model is
discrete, so there is no dequantisation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .builtin import builtin_dataset
from .clips import BUILTIN_CLIPS, check_clip_array, load_clip_array
from .labels import load_class_names, load_labels
from .moving_digits import moving_digits
from .sources import PREPARE_HINT, check_image_array, load_array


class ImageArrayDataset(Dataset):
    """Images of a uint8 array [N, H, W, C] as uint8 tensors [C, H, W]; with `labels` (checked
    int64 [N]) each item is (image, label as an int64 0-d tensor). With `file` (the .npy that
    `array` maps) images are read from the file with pread, not through the map: a read past the
    end of a file cut short after it was opened would kill the process with SIGBUS."""

    check = staticmethod(check_image_array)

    def __init__(self, array: np.ndarray, labels: np.ndarray | None = None,
                 file: Path | None = None):
        self.array, self.labels, self.file = self.check(array, "array"), labels, file
        if file is not None:
            self.offset = int(array.offset)  # where np.load's memmap starts: after the header
            self.image_bytes = math.prod(self.array.shape[1:])

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        index = range(len(self))[index]  # an IndexError past the end, as for an array
        image = self.array[index] if self.file is None else self.read(index)
        # Channels moved first ([C, H, W], a clip's [C, T, H, W]) in a copy, so the tensor owns
        # its memory (never the read-only memmap's).
        image = torch.from_numpy(np.array(np.moveaxis(image, -1, 0), order="C"))
        return image if self.labels is None else (image, torch.tensor(self.labels[index]))

    def read(self, index: int) -> np.ndarray:
        start = self.offset + index * self.image_bytes
        with open(self.file, "rb") as f:
            data = os.pread(f.fileno(), self.image_bytes, start)
        if len(data) < self.image_bytes:
            size, expected = os.path.getsize(self.file), self.offset + len(self) * self.image_bytes
            raise ValueError(f"{self.file}: ends before image {index} ({size:,} bytes, expected "
                             f"{expected:,}): the file was cut short while it was read; prepare "
                             f"it again")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.array.shape[1:])


class ClipArrayDataset(ImageArrayDataset):
    """Clips of a uint8 array [N, T, H, W, C] as uint8 tensors [C, T, H, W] (the model takes
    [B, C, T, H, W]), read as ImageArrayDataset reads images."""

    check = staticmethod(check_clip_array)


def split_path(spec: str | Path, split: str) -> Path:
    """A prepared .npy file, or `{split}.npy` inside a directory."""
    path = Path(spec)
    if not path.is_dir():
        return path
    file = path / f"{split}.npy"
    if not file.is_file():
        found = sorted(p.name for p in path.glob("*.npy")) or "no .npy files"
        raise FileNotFoundError(f"{file}: no {split!r} split in {path} (found {found}); "
                                f"{PREPARE_HINT}")
    return file


def open_split(spec: str | Path, split: str, image_size: tuple[int, int], channels: int,
               num_classes: int = 0, trained: bool = False,
               frames: int = 0) -> ImageArrayDataset:
    """One split: "builtin", a prepared .npy file, or a directory holding `{split}.npy`. The
    images must be exactly `image_size` (H, W) with `channels` channels: resizing is for
    `prepare` to do, not training. With `num_classes` > 0 items are (image, label), the labels
    read from beside it. A misfit is refused with what to change: the model's config, or for a
    `trained` model the images. With `frames` > 0 the split holds clips of that many frames
    (`open_clip_split`)."""
    if frames:
        return open_clip_split(spec, split, frames, image_size, channels, num_classes, trained)
    h, w = image_size
    if str(spec) == BUILTIN_CLIPS:
        raise ValueError(f"data.spec={BUILTIN_CLIPS} holds clips, but the model takes images; "
                         f"set model.frames (e.g. model.frames=8)")
    if str(spec) == "builtin":
        if num_classes:
            raise ValueError("the built-in dataset has no class labels; it needs num_classes=0")
        return ImageArrayDataset(builtin_dataset(split, (h, w), channels))
    path = split_path(spec, split)
    array = load_array(path)
    found = tuple(array.shape[1:])
    if found != (h, w, channels):
        raise ValueError(size_mismatch(path, found, (h, w, channels), trained))
    if len(array) == 0:
        raise ValueError(f"{path}: holds no images")
    labels = load_labels(path, len(array), num_classes) if num_classes else None
    return ImageArrayDataset(array, labels, file=path)


def size_mismatch(path: Path, found: tuple[int, ...], expected: tuple[int, int, int],
                  trained: bool = False) -> str:
    (fh, fw, fc), (h, w, c) = found, expected
    resize = f"--image-size {h} {w} --resize" if (fh, fw) != (h, w) else ""
    if trained:  # the images must change
        again = " ".join(filter(None, [resize, f"--channels {c}" * (fc != c)]))
        return (f"{path}: this model takes images of H x W x C = {h} x {w} x {c}, found "
                f"{fh} x {fw} x {fc}; prepare them again with {again}")
    fixes = [f"model.image_size=[{fh},{fw}]"] * bool(resize) + [f"model.channels={fc}"] * (fc != c)
    return (f"{path}: expected images of H x W x C = {h} x {w} x {c} (image_size={[h, w]}, "
            f"channels={c}), found {fh} x {fw} x {fc}; a model of these images needs "
            f"{' '.join(fixes)}" + f"; or prepare them again with {resize}" * bool(resize))


def open_clip_split(spec: str | Path, split: str, frames: int, image_size: tuple[int, int],
                    channels: int, num_classes: int = 0,
                    trained: bool = False) -> ClipArrayDataset:
    """One split of clips: "moving-digits" (built in, made at `frames` x `image_size`), a
    prepared .npy [N, T, H, W, C], or a directory holding `{split}.npy`; items are uint8 tensors
    [C, T, H, W] (with `num_classes` > 0, (clip, label)). The clips must be exactly `frames` x
    `image_size` with `channels` channels, or are refused as `open_split` refuses images."""
    h, w = image_size
    if str(spec) == "builtin":
        raise ValueError(f"data.spec=builtin holds images, but the model takes clips of {frames} "
                         f"frames; use data.spec={BUILTIN_CLIPS}, or model.frames=0 for images")
    if str(spec) == BUILTIN_CLIPS:
        if num_classes:
            raise ValueError(f"{BUILTIN_CLIPS} has no class labels; it needs num_classes=0")
        if channels != 1:
            raise ValueError(f"{BUILTIN_CLIPS} is grayscale: it needs model.channels=1, not "
                             f"{channels}")
        return ClipArrayDataset(moving_digits(split, frames=frames, image_size=(h, w)))
    path = split_path(spec, split)
    array = load_clip_array(path)
    found = tuple(array.shape[1:])
    if found != (frames, h, w, channels):
        raise ValueError(clip_size_mismatch(path, found, (frames, h, w, channels), trained))
    if len(array) == 0:
        raise ValueError(f"{path}: holds no clips")
    labels = load_labels(path, len(array), num_classes) if num_classes else None
    return ClipArrayDataset(array, labels, file=path)


def clip_size_mismatch(path: Path, found: tuple[int, ...], expected: tuple[int, int, int, int],
                       trained: bool = False) -> str:
    (ft, fh, fw, fc), (t, h, w, c) = found, expected
    again = " ".join(filter(None, [
        f"--frames {t}" * (ft != t),
        f"--image-size {h} {w} --resize" * ((fh, fw) != (h, w)),
        f"--channels {c}" * (fc != c)]))
    if trained:  # the clips must change
        return (f"{path}: this model takes clips of T x H x W x C = {t} x {h} x {w} x {c}, found "
                f"{ft} x {fh} x {fw} x {fc}; prepare them again with {again}")
    fixes = ([f"model.frames={ft}"] * (ft != t) + [f"model.image_size=[{fh},{fw}]"]
             * ((fh, fw) != (h, w)) + [f"model.channels={fc}"] * (fc != c))
    return (f"{path}: expected clips of T x H x W x C = {t} x {h} x {w} x {c} (frames={t}, "
            f"image_size={[h, w]}, channels={c}), found {ft} x {fh} x {fw} x {fc}; a model of "
            f"these clips needs {' '.join(fixes)}; or prepare them again with {again}")


def class_names(spec: str | Path, split: str) -> list[str] | None:
    """The class names beside a prepared split (name k for label k), or None (none saved, or
    "builtin" or "moving-digits")."""
    return (None if str(spec) in ("builtin", BUILTIN_CLIPS)
            else load_class_names(split_path(spec, split)))


def split_batch(batch: torch.Tensor | list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of a batch of a labelled split; (images, None) of an unlabelled one."""
    return (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
