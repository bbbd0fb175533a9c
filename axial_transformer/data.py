"""Image data as uint8 arrays [N, H, W, C] memory-mapped from prepared .npy files.

Training reads one `.npy` per split, written once by `prepare` from any supported source
(ImageNet-32/64 tars, npz batches, CIFAR-10, MNIST, folders of images, arrays):

    python -m axial_transformer.data prepare train_32x32.tar data/imagenet32/train.npy
    python -m axial_transformer.data prepare valid_32x32.tar data/imagenet32/test.npy

Pixels stay uint8 0..255 end to end: the model is discrete, so there is no dequantisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .builtin_data import builtin_dataset

__all__ = ["ImageArrayDataset", "builtin_dataset", "load_array", "open_split"]

PREPARE_HINT = "create it with `python -m axial_transformer.data prepare SOURCE OUT.npy`"


def check_image_array(array: np.ndarray, name: str) -> np.ndarray:
    """Validate a uint8 [N, H, W, C] or [N, H, W] array; return it as [N, H, W, C] (no copy)."""
    if not isinstance(array, np.ndarray):
        kind = type(array).__name__
        raise ValueError(f"{name}: expected a numpy array saved as .npy, got {kind}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels 0..255, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        shape = list(array.shape)
        raise ValueError(f"{name}: expected shape [N, H, W, C] or [N, H, W], got {shape}")
    return array


def load_array(path: str | Path) -> np.ndarray:
    """Memory-map a prepared uint8 .npy of images; returns [N, H, W, C] ([N, H, W] gets C = 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image array; {PREPARE_HINT}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays (pickles) and files that are not .npy at all
        raise ValueError(f"{path}: not a uint8 .npy image array ({e})") from None
    return check_image_array(array, str(path))


class ImageArrayDataset(Dataset):
    """Images of a uint8 array [N, H, W, C] (often a memmap) as uint8 tensors [C, H, W]."""

    def __init__(self, array: np.ndarray):
        self.array = check_image_array(array, "ImageArrayDataset")

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        # Always copy out of the (read-only) memmap, into CHW order, so the tensor owns its memory.
        return torch.from_numpy(np.array(self.array[index].transpose(2, 0, 1), order="C"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.array.shape[1:])


def split_path(spec: str | Path, split: str) -> Path:
    """A prepared .npy file, or `{split}.npy` inside a directory."""
    path = Path(spec)
    if not path.is_dir():
        return path
    file = path / f"{split}.npy"
    if not file.is_file():
        found = sorted(p.name for p in path.glob("*.npy")) or "no .npy files"
        raise FileNotFoundError(
            f"{file}: no {split!r} split in {path} (found {found}); {PREPARE_HINT}"
        )
    return file


def open_split(
    spec: str, split: str, image_size: tuple[int, int], channels: int
) -> ImageArrayDataset:
    """Open one split: "builtin", a prepared .npy file, or a directory holding `{split}.npy`.

    The images must be exactly `image_size` (H, W) with `channels` channels: resizing is a
    decision for `prepare`, not something to do silently at training time.
    """
    h, w = image_size
    if str(spec) == "builtin":
        return ImageArrayDataset(builtin_dataset(split, (h, w), channels))
    path = split_path(spec, split)
    array = load_array(path)
    found = tuple(array.shape[1:])
    if found != (h, w, channels):
        raise ValueError(
            f"{path}: expected images of H x W x C = {h} x {w} x {channels} "
            f"(image_size={[h, w]}, channels={channels}), "
            f"found {found[0]} x {found[1]} x {found[2]}"
        )
    if len(array) == 0:
        raise ValueError(f"{path}: holds no images")
    return ImageArrayDataset(array)
