"""Moving digits: clips of two handwritten digits bouncing around a canvas, Moving MNIST's recipe
(Srivastava, Mansimov and Salakhutdinov 2015, "Unsupervised Learning of Video Representations
using LSTMs", section 4: two 28x28 MNIST digits moving inside a 64x64 patch, each with a random
direction and speed, bouncing off the edges, overlaps combined by taking the maximum), built from
the 1,797 8x8 digits that scikit-learn ships (`load_digits` reads `digits.csv.gz` inside the
package: nothing is downloaded). Whole digit images are held out for the test split, so no test
digit was seen in training. Deterministic for a seed, and built in well under a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "test")
# Defaults sized for a CPU demo of a few minutes: a clip of 8 frames of 16x16 is 2,048 pixels, two
# thirds of one 32x32 RGB image; at 16x16 the 8x8 digits keep about Moving MNIST's ratio (28 of 64).
CANVAS = (16, 16)
FRAMES = 8
COUNTS = {"train": 4096, "test": 512}
# Each digit moves a whole number of pixels a frame along each axis, STEP * (dy, dx) with dy, dx
# in {-1, 0, 1} and not both 0: one of 8 directions, drawn uniformly. Moving MNIST's 3.6 pixels
# a frame on 64x64 scale to 0.9 at 16x16: STEP pixels a frame there, scaled with the canvas side
# (4 at 64x64).
# Whole pixels keep the motion exact: rounding a sub-pixel path makes a digit's steps jitter
# (1, 2, 1, 2, ... pixels), which no model can tell from two frames (docs/benchmarks.md, Video).
STEP = 1
DIGITS_PER_CLIP = 2
DIRECTIONS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
TEST_DIGITS = 0.2  # the fraction of scikit-learn's digit images held out for the test split
DIGIT_SPLIT_SEED = 0  # fixed, whatever the clips' seed: the two splits never share a digit


def digit_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's digit images as uint8 [K, 8, 8] (0..16 scaled to 0..255) and the index of
    each in scikit-learn's `load_digits()` [K]."""
    if split not in SPLITS:
        raise ValueError(f"moving-digits split must be one of {SPLITS}, got {split!r}")
    digits = load_digits()
    order = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(len(digits))
    held = round(TEST_DIGITS * len(digits))
    index = np.sort(order[:held] if split == "test" else order[held:])
    return np.round(digits[index] * (255 / 16)).astype(np.uint8), index


def load_digits() -> np.ndarray:
    """scikit-learn's digits as uint8 [1797, 8, 8] in 0..16: the file `load_digits()` reads
    (rows of 64 pixels and the label), found without importing scikit-learn, which takes 2 s."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the moving-digits set draws the digits shipped with "
                                  "scikit-learn; install it (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return rows[:, :64].reshape(-1, 8, 8)


def default_digit_size(canvas: tuple[int, int]) -> int:
    """Moving MNIST's ratio (28 of 64), but never below the digits' own 8 pixels."""
    return max(8, round(min(canvas) * 28 / 64))


def bounce(position: np.ndarray, room: int) -> np.ndarray:
    """Straight-line positions folded into 0..room: a reflection at each edge (a triangle wave)."""
    if room == 0:
        return np.zeros_like(position)
    folded = np.mod(position, 2 * room)
    return room - np.abs(folded - room)


def moving_digits_clips(
    split: str = "train", count: int | None = None, frames: int = FRAMES,
    image_size: tuple[int, int] = CANVAS, digit_size: int | None = None, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` clips (default COUNTS[split]) of `frames` frames as uint8 [N, T, H, W, 1], and the
    `load_digits()` index of each clip's two digits [N, 2]. Digits are resized (bilinear) to
    `digit_size` (default: Moving MNIST's 28/64 of the canvas side, at least 8)."""
    h, w = image_size = tuple(int(s) for s in image_size)
    count = COUNTS.get(split, 0) if count is None else int(count)
    digits, index = digit_images(split)
    size = default_digit_size(image_size) if digit_size is None else int(digit_size)
    if count < 1 or frames < 1 or size < 1:
        raise ValueError(f"moving-digits needs count, frames and digit_size of at least 1, got "
                         f"{count}, {frames}, {size}")
    if size > min(h, w):
        raise ValueError(f"moving-digits: {size}x{size} digits do not fit a {h}x{w} canvas; "
                         f"pass a larger image size or a smaller digit size")
    if size != digits.shape[1]:
        digits = np.stack([np.asarray(Image.fromarray(d).resize((size, size),
                                                                 Image.Resampling.BILINEAR))
                           for d in digits])
    # Each split its own stream: changing the test count leaves the training clips as they were.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n, k = count, DIGITS_PER_CLIP
    chosen = rng.integers(0, len(digits), (n, k))
    room = np.array([h - size, w - size])  # top-left corners lie in 0..room
    start = rng.integers(0, room + 1, (n, k, 2))
    direction = DIRECTIONS[rng.integers(0, len(DIRECTIONS), (n, k))]
    velocity = direction * max(1, round(STEP * min(h, w) / CANVAS[0]))
    t = np.arange(frames)[None, :, None, None]
    path = start[:, None] + t * velocity[:, None]  # (N, T, k, 2): unfolded (y, x)
    corner = np.stack([bounce(path[..., a], int(room[a])) for a in (0, 1)], axis=-1)

    clips = np.zeros((n, frames, h, w), dtype=np.uint8)
    clip, frame = np.arange(n)[:, None, None, None], np.arange(frames)[None, :, None, None]
    offset = np.arange(size)
    for d in range(k):  # one digit's pixels are distinct, so a gather-max-scatter is exact
        rows = (corner[:, :, d, 0, None] + offset)[..., :, None]  # (N, T, s, 1)
        cols = (corner[:, :, d, 1, None] + offset)[..., None, :]  # (N, T, 1, s)
        patch = digits[chosen[:, d]][:, None]  # (N, 1, s, s)
        clips[clip, frame, rows, cols] = np.maximum(clips[clip, frame, rows, cols], patch)
    return clips[..., None], index[chosen]


def moving_digits(split: str = "train", count: int | None = None, frames: int = FRAMES,
                  image_size: tuple[int, int] = CANVAS, digit_size: int | None = None,
                  seed: int = 0) -> np.ndarray:
    """uint8 clips [N, T, H, W, 1] of two bouncing digits (see `moving_digits_clips`)."""
    return moving_digits_clips(split, count, frames, image_size, digit_size, seed)[0]
