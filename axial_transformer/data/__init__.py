"""Images and their labels: prepared once into uint8 .npy files (`prepare`, sources.py), then
memory-mapped for training and evaluation (splits.py)."""

from .splits import (
    CorruptImageError,
    ImageArrayDataset,
    builtin_dataset,
    class_names,
    load_array,
    open_split,
    prepare,
    prepare_holdout,
)

__all__ = [
    "CorruptImageError",
    "ImageArrayDataset",
    "builtin_dataset",
    "class_names",
    "load_array",
    "open_split",
    "prepare",
    "prepare_holdout",
]
