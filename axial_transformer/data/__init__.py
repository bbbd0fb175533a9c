"""Images and their labels, or clips: prepared once into uint8 .npy files (`prepare`, sources.py,
clips.py), then memory-mapped for training and evaluation (splits.py)."""

from .builtin import builtin_dataset
from .clips import load_clip_array
from .image_files import CorruptImageError
from .prepare import prepare, prepare_holdout
from .sources import load_array
from .splits import ClipArrayDataset, ImageArrayDataset, class_names, open_clip_split, open_split

__all__ = ["ClipArrayDataset", "CorruptImageError", "ImageArrayDataset", "builtin_dataset",
           "class_names", "load_array", "load_clip_array", "open_clip_split",
           "open_split", "prepare", "prepare_holdout"]
