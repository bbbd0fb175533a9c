"""Images and their labels: prepared once into uint8 .npy files (`prepare`, sources.py), then
memory-mapped for training and evaluation (splits.py)."""

from .builtin import builtin_dataset
from .image_files import CorruptImageError
from .prepare import prepare, prepare_holdout
from .sources import load_array
from .splits import ImageArrayDataset, class_names, open_split

__all__ = ["CorruptImageError", "ImageArrayDataset", "builtin_dataset", "class_names",
           "load_array", "open_split", "prepare", "prepare_holdout"]
