"""Class labels beside prepared images: `X.npy` (uint8 [N, H, W, C]) of a labelled split has
`X_labels.npy` (int64 [N], the class of image i, in 0..K-1) and `X_classes.json` (a JSON list of
the K class names). The same naming marks a labelled `.npy` source for `prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def labels_path(images: Path) -> Path:
    return images.with_name(f"{images.stem}_labels.npy")


def classes_path(images: Path) -> Path:
    return images.with_name(f"{images.stem}_classes.json")


def check_labels(labels: object, name: str, count: int, num_classes: int | None,
                 first: int = 0) -> np.ndarray:
    """Labels numbered from `first` as int64 [count] in 0..num_classes-1 (any number of classes
    for None); anything else is a ValueError naming `name`."""
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.ndim != 1:
        found = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, np.ndarray)
                 else type(labels).__name__)
        raise ValueError(f"{name}: expected integer class labels [N], got {found}")
    if len(labels) != count:
        raise ValueError(f"{name}: holds {len(labels):,} labels, expected one per image "
                         f"({count:,})")
    labels = labels.astype(np.int64) - first
    high = np.iinfo(np.int64).max if num_classes is None else num_classes
    bad = (labels < 0) | (labels >= high)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        expected = (f"{first} or more" if num_classes is None
                    else f"{first}..{first + high - 1} (num_classes={high})")
        raise ValueError(f"{name}: label {labels[i] + first} of image {i} is outside {expected} "
                         f"({int(bad.sum()):,} labels are)")
    return labels


def load_labels(images: Path, count: int, num_classes: int | None) -> np.ndarray:
    """The labels beside `images`, checked as by `check_labels`."""
    path = labels_path(images)
    if not path.is_file():
        raise ValueError(f"{path}: no such labels file beside {images.name} (class labels "
                         f"int64 [N]); `prepare` writes it for sources with labels")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays, damaged or foreign files
        raise ValueError(f"{path}: not a .npy of class labels ({e})") from None
    return check_labels(labels, str(path), count, num_classes)


def load_class_names(images: Path) -> list[str] | None:
    """The class names beside `images`, or None when there is no `X_classes.json`."""
    path = classes_path(images)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not a JSON list of class names ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class names (strings)")
    return names
