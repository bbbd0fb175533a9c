"""A small real-image dataset that needs no download: crops, at a few scales, of the photographs
that scikit-image and scikit-learn ship, downsampled with a Lanczos filter so that each looks like
a downsampled-ImageNet image. Whole photographs are held out for the test split, so no test pixel
was seen in training. Deterministic, and built in about a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# (package, file in it): what skimage.data.<name>() and sklearn.datasets.load_sample_image() read;
# read directly, so that skimage's pooch fetcher (which downloads what it lacks) stays out.
PHOTOGRAPHS = {
    "astronaut": ("skimage", "data/astronaut.png"), "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"), "chelsea": ("skimage", "data/chelsea.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
# Whole photographs per split. motorcycle_left/right are a stereo pair of one scene: both train.
SPLITS = {
    "train": ("astronaut", "coffee", "rocket", "hubble_deep_field", "motorcycle_left",
              "motorcycle_right", "china"),
    "test": ("chelsea", "flower"),
}

# Crop side as a fraction of the largest crop (with the target aspect ratio) that fits the photo.
# Scale 1 is the whole photo, like an ImageNet image; smaller scales zoom in on parts of it.
CROP_SCALES = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 6)
SHUFFLE_SEED = 0


def photograph_path(name: str) -> Path:
    package, relative = PHOTOGRAPHS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it (fast)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in dataset reads photographs shipped with {package}; install it (pip "
            f"install {'scikit-learn' if package == 'sklearn' else 'scikit-image'})")
    return Path(spec.submodule_search_locations[0]) / relative


def crop_boxes(photo_size: tuple[int, int], image_size: tuple[int, int]) -> list[tuple[float, ...]]:
    """Boxes (left, top, right, bottom) on a grid with half-crop stride, at each of CROP_SCALES;
    crops smaller than the target are skipped, so every crop is downsampled, never upsampled."""
    (pw, ph), (h, w) = photo_size, image_size
    largest = min(ph / h, pw / w)  # the biggest crop of aspect h:w is (largest*h, largest*w)
    boxes = []
    for scale in CROP_SCALES:
        ch, cw = largest * scale * h, largest * scale * w
        if ch < h or cw < w:
            continue
        boxes += [(left, top, left + cw, top + ch)
                  for top in np.linspace(0, ph - ch, int((ph - ch) // (ch / 2)) + 1)
                  for left in np.linspace(0, pw - cw, int((pw - cw) // (cw / 2)) + 1)]
    return boxes


def builtin_crops(split: str, image_size: tuple[int, int] = (32, 32),
                  channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The built-in split as uint8 images [N, H, W, C] and the photograph name of each crop [N]."""
    if split not in SPLITS:
        raise ValueError(f"built-in dataset split must be one of {sorted(SPLITS)}, got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"built-in dataset has 1 (grayscale) or 3 (RGB) channels, got {channels}")
    h, w = image_size = tuple(int(s) for s in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be two positive ints (H, W), got {image_size}")

    crops, sources = [], []
    for name in SPLITS[split]:
        with Image.open(photograph_path(name)) as im:
            photo = im.convert("RGB" if channels == 3 else "L")
        # Flipped test crops would add near-copies, not new evidence, to an evaluation.
        for flip in (False, True) if split == "train" else (False,):
            view = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else photo
            for box in crop_boxes(view.size, image_size):
                crops.append(np.asarray(view.resize((w, h), Image.Resampling.LANCZOS, box=box)))
                sources.append(name)
    if not crops:
        raise ValueError(f"image_size {image_size} is larger than every built-in photograph")

    images = np.stack(crops).reshape(len(crops), h, w, channels)
    # Shuffle once with a fixed seed so that any prefix (e.g. a quick evaluation on the first 64
    # test images) mixes photographs instead of being 64 crops of one.
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(crops))
    return np.ascontiguousarray(images[order]), np.asarray(sources)[order]


def builtin_dataset(split: str, image_size: tuple[int, int] = (32, 32),
                    channels: int = 3) -> np.ndarray:
    """uint8 [N, H, W, C] crops of photographs shipped with scikit-image and scikit-learn."""
    return builtin_crops(split, image_size, channels)[0]
