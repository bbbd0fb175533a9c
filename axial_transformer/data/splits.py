"""Prepared splits (uint8 .npy [N, H, W, C], docs/data.md) as datasets for training and
evaluation. Pixels stay uint8 0..255 end to end: the model is discrete, so there is no
dequantisation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .builtin import builtin_dataset
from .labels import load_class_names, load_labels
from .sources import PREPARE_HINT, check_image_array, load_array


class ImageArrayDataset(Dataset):
    """Images of a uint8 array [N, H, W, C] as uint8 tensors [C, H, W]; with `labels` (checked
    int64 [N]) each item is (image, label as an int64 0-d tensor). With `file` (the .npy that
    `array` maps) images are read from the file with pread, not through the map: a read past the
    end of a file cut short after it was opened would kill the process with SIGBUS."""

    def __init__(self, array: np.ndarray, labels: np.ndarray | None = None,
                 file: Path | None = None):
        self.array, self.labels, self.file = check_image_array(array, "array"), labels, file
        if file is not None:
            self.offset = int(array.offset)  # where np.load's memmap starts: after the header
            self.image_bytes = math.prod(self.array.shape[1:])

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        index = range(len(self))[index]  # an IndexError past the end, as for an array
        image = self.array[index] if self.file is None else self.read(index)
        # Copied into CHW order, so the tensor owns its memory (never the read-only memmap's).
        image = torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))
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
               num_classes: int = 0, trained: bool = False) -> ImageArrayDataset:
    """One split: "builtin", a prepared .npy file, or a directory holding `{split}.npy`. The
    images must be exactly `image_size` (H, W) with `channels` channels: resizing is for
    `prepare` to do, not training. With `num_classes` > 0 items are (image, label), the labels
    read from beside it. A misfit is refused with what to change: the model's config, or for a
    `trained` model the images."""
    h, w = image_size
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


def class_names(spec: str | Path, split: str) -> list[str] | None:
    """The class names beside a prepared split (name k for label k), or None (none saved, or
    "builtin")."""
    return None if str(spec) == "builtin" else load_class_names(split_path(spec, split))


def split_batch(batch: torch.Tensor | list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of a batch of a labelled split; (images, None) of an unlabelled one."""
    return (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
