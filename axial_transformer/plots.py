"""Pictures a user looks at: sample grids big enough to see, with their rows labelled, clips as
animated GIF grids, and the loss curve of a run. Drawn with PIL alone (no plotting library to
install)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A grid's longer side is enlarged to at least this many pixels: 64 samples of 16 x 16 make a
# 146-pixel grid, too small to see on a screen.
MIN_SIDE = 512
PAD = 1


def image_grid(images: torch.Tensor, nrow: int, levels: int = 256,
               row_labels: Sequence[str] | None = None, min_side: int = MIN_SIDE) -> Image.Image:
    """uint8 [N, C, H, W] -> an RGB grid of `nrow` images per row on white, enlarged by nearest
    neighbour (every pixel an exact square) until its longer side is at least `min_side`, with
    `row_labels` written left of the rows when given."""
    # Spread over 0..255: a model of 17 levels draws 0..16, which would show as black.
    x = (images.to(torch.int64) * 255 // (levels - 1)).clamp(0, 255).to(torch.uint8)
    pixels = x.permute(0, 2, 3, 1).numpy()
    pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]
    n, h, w, _ = pixels.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + PAD) + PAD, nrow * (w + PAD) + PAD, 3), 255, np.uint8)
    for k, image in enumerate(pixels):
        top, left = PAD + (k // nrow) * (h + PAD), PAD + (k % nrow) * (w + PAD)
        grid[top:top + h, left:left + w] = image
    zoom = max(1, math.ceil(min_side / max(grid.shape[:2])))
    picture = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom),
                                           Image.NEAREST)
    if row_labels is None:
        return picture
    font = ImageFont.load_default(size=min(24, max(12, h * zoom // 3)))
    draw = ImageDraw.Draw(picture)
    margin = 12 + max(math.ceil(draw.textlength(label, font=font)) for label in row_labels)
    labelled = Image.new("RGB", (picture.width + margin, picture.height), "white")
    labelled.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for k, label in enumerate(row_labels):
        middle = (PAD + k * (h + PAD) + h / 2) * zoom
        draw.text((6, middle), label, fill="black", anchor="lm", font=font)
    return labelled


# A clip plays at 4 frames per second, slow enough to follow a frame's change.
FRAME_MS = 250
# The bar under a clip grid that shows which frame plays: given frames in blue, drawn ones in
# orange (it also keeps two equal frames apart: Pillow merges identical GIF frames).
GIVEN, DRAWN = (31, 119, 180), (255, 127, 14)


def clip_grid(clips: torch.Tensor, nrow: int, levels: int = 256, given: int = 0,
              min_side: int = MIN_SIDE) -> list[Image.Image]:
    """uint8 clips [N, C, T, H, W] -> one `image_grid` per frame (clips side by side, `nrow` a
    row), each with a bar below it that fills up as the clip plays, its first `given` frames
    (known, not drawn) in another colour."""
    frames = clips.shape[2]
    pictures = []
    for t in range(frames):
        grid = image_grid(clips[:, :, t], nrow, levels, min_side=min_side)
        bar = max(4, grid.height // 64)
        picture = Image.new("RGB", (grid.width, grid.height + bar), "white")
        picture.paste(grid, (0, 0))
        draw = ImageDraw.Draw(picture)
        for k in range(t + 1):
            left, right = grid.width * k // frames, grid.width * (k + 1) // frames - 1
            draw.rectangle([left, grid.height, right, grid.height + bar - 1],
                           fill=GIVEN if k < given else DRAWN)
        pictures.append(picture)
    return pictures


def save_gif(pictures: list[Image.Image], file, duration: int = FRAME_MS) -> None:
    """An animated GIF of `pictures`, one GIF frame each, looping."""
    pictures[0].save(file, format="GIF", save_all=True, append_images=pictures[1:],
                     duration=duration, loop=0)


def loss_curve(records: list[dict], size: tuple[int, int] = (720, 420)) -> Image.Image | None:
    """The training loss (train/loss_bpd) and test bits/dim (eval/bpd) of metrics.jsonl records
    against the step; None while there is nothing to draw."""
    series = {key: [(r["step"], r[key]) for r in records
                    if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
              for key in ("train/loss_bpd", "eval/bpd")}
    points = [p for values in series.values() for p in values]
    if not points:
        return None
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    x_max = max(step for step, _ in points) or 1
    y_low, y_high = min(v for _, v in points), max(v for _, v in points)
    y_low, y_high = (y_low - 0.5, y_high + 0.5) if y_high - y_low < 1e-9 else (y_low, y_high)

    def at(step: float, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / x_max,
                top + (height - top - bottom) * (y_high - value) / (y_high - y_low))

    picture = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=13)
    for k in range(5):  # horizontal grid lines with their bits/dim
        value = y_low + (y_high - y_low) * k / 4
        _, y = at(0, value)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), f"{value:.3f}", fill="black", anchor="rm", font=font)
    for k in range(5):  # the steps along the bottom
        step = round(x_max * k / 4)
        x, _ = at(step, y_low)
        draw.text((x, height - bottom + 6), f"{step:,}", fill="black", anchor="mt", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    colours = {"train/loss_bpd": (31, 119, 180), "eval/bpd": (255, 127, 14)}
    names = {"train/loss_bpd": "training loss (bits/dim)", "eval/bpd": "test bits/dim (EMA)"}
    x_text = left
    for key, values in series.items():
        xy = [at(step, value) for step, value in values]
        if len(xy) > 1:
            draw.line(xy, fill=colours[key], width=2)
        for x, y in xy if key == "eval/bpd" or len(xy) == 1 else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[key])
        if values:
            draw.text((x_text, top / 2), names[key], fill=colours[key], anchor="lm", font=font)
            x_text += draw.textlength(names[key], font=font) + 24
    draw.text((width - right, height - 4), "step", fill="black", anchor="rb", font=font)
    return picture


def write_loss_curve(run_dir: str | Path) -> Path | None:
    """RUN/loss_curve.png, drawn from RUN/metrics.jsonl; None when there is nothing to draw."""
    from .files import atomic_write
    from .training.run_log import read_records

    picture = loss_curve(read_records(Path(run_dir) / "metrics.jsonl"))
    if picture is None:
        return None
    atomic_write(Path(run_dir) / "loss_curve.png", lambda tmp: picture.save(tmp, format="PNG"))
    return Path(run_dir) / "loss_curve.png"
