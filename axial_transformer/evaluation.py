"""Exact bits/dim over a whole test split, its per-pixel heatmap, and lossless-codec baselines.
Each process scores a disjoint share of the images (each once: no padding, no dropped remainder)
and the sums are all-reduced, so the result is the same on one process or many. A video model's
clips are scored the same way, with the bits of each frame summed as well (bits/dim per frame)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .data.splits import split_batch
from .files import atomic_write
from .precision import choose_precision


def shard_indices(num_images: int, rank: int, world: int) -> range:
    return range(rank, num_images, world)  # every world-th image


@dataclass
class BitSums:
    """Sums over scored images, in float64 so that 50,000 images add up exactly enough."""

    channel_bits: Tensor  # (C,) bits of each channel summed over images and pixels
    pixel_bits: Tensor | None  # (C, H, W) bits of each subpixel summed over images; (C, T, H, W)
    images: int  # images, or clips
    frame_bits: Tensor | None = None  # a video model's (T,): bits of each frame summed over clips

    def __add__(self, other: BitSums) -> BitSums:
        pixel = None if self.pixel_bits is None else self.pixel_bits + other.pixel_bits
        frame = None if self.frame_bits is None else self.frame_bits + other.frame_bits
        return BitSums(self.channel_bits + other.channel_bits, pixel, self.images + other.images,
                       frame)


@torch.no_grad()
def bit_sums(model: nn.Module, dataset: Dataset, indices: range | list[int], batch_size: int,
             device: torch.device | str = "cpu", bf16: bool = False, per_pixel: bool = False,
             workers: int = 0, progress: bool = False, no_class: bool = False) -> BitSums:
    """Bits of the images `dataset[i]`, i in `indices`, given their labels in a labelled split
    (or "no class" with `no_class`); of a video model's clips, also per frame."""
    was_training = model.training
    model.eval()
    c, (h, w), frames = model.config.channels, model.config.image_size, model.config.frames
    shape = (c, frames, h, w) if frames else (c, h, w)  # one image or clip, without the batch
    sums = BitSums(torch.zeros(c, dtype=torch.float64, device=device),
                   torch.zeros(shape, dtype=torch.float64, device=device) if per_pixel
                   else None, 0,
                   torch.zeros(frames, dtype=torch.float64, device=device) if frames else None)
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    # fp32 by default: bits/dim is the number reported, bf16 logits move it in the 3rd decimal.
    precision = choose_precision("bf16" if bf16 else "no", device)
    for batch in tqdm(loader, desc="evaluating", unit="batch", leave=False,
                      disable=not progress, dynamic_ncols=True):
        x, labels = split_batch(batch)
        x = x.to(device)
        if labels is not None and no_class:
            labels = torch.full_like(labels, -1)
        with precision.autocast(torch.device(device).type):
            # (B, C, H, W), or a video model's (B, C, T, H, W): it takes no labels
            bits = (model.subpixel_bits(x) if labels is None
                    else model.subpixel_bits(x, labels)).double()
        sums += BitSums(sum_but(bits, 1), bits.sum(dim=0) if per_pixel else None, x.shape[0],
                        sum_but(bits, 2) if frames else None)
    model.train(was_training)
    return sums


def sum_but(bits: Tensor, axis: int) -> Tensor:
    """`bits` summed over every axis but `axis`."""
    return bits.sum(dim=tuple(d for d in range(bits.ndim) if d != axis))


def summarize(sums: BitSums, image_size: tuple[int, int]) -> dict:
    """bits/dim of the images (or clips: "bpd" over every subpixel of the clip, comparable with
    published video figures), per channel and, for clips, per frame ("bpd_frame", a list)."""
    if sums.images == 0:
        raise ValueError("no test images were scored")
    pixels = sums.images * image_size[0] * image_size[1]
    frames = 1 if sums.frame_bits is None else len(sums.frame_bits)
    per_channel = (sums.channel_bits / (pixels * frames)).tolist()
    metrics = {"bpd": sum(per_channel) / len(per_channel), "bpd_channel": per_channel,
               "images": sums.images}
    if sums.frame_bits is not None:
        metrics["bpd_frame"] = (sums.frame_bits / (pixels * len(sums.channel_bits))).tolist()
    return metrics


def evaluate(model: nn.Module, dataset: Dataset, accelerator, batch_size: int,
             max_images: int = 0, bf16: bool = False, per_pixel: bool = False, workers: int = 0,
             progress: bool = False, no_class: bool = False) -> tuple[dict, Tensor | None]:
    """bits/dim of `model` over `dataset` (its first `max_images` if nonzero) on all processes,
    and with `per_pixel` the mean bits of each subpixel (C, H, W; a clip's C, T, H, W). Give
    `progress` to the main process; a class-conditional model is given each image's label, or
    none with `no_class`."""
    n = len(dataset) if max_images == 0 else min(max_images, len(dataset))
    indices = shard_indices(n, accelerator.process_index, accelerator.num_processes)
    sums = bit_sums(model, dataset, indices, batch_size, accelerator.device, bf16, per_pixel,
                    workers, progress, no_class)
    images = torch.tensor([sums.images], dtype=torch.float64, device=accelerator.device)
    sums = BitSums(accelerator.reduce(sums.channel_bits, "sum"),
                   accelerator.reduce(sums.pixel_bits, "sum") if per_pixel else None,
                   int(accelerator.reduce(images, "sum").item()),
                   None if sums.frame_bits is None else accelerator.reduce(sums.frame_bits, "sum"))
    metrics = summarize(sums, model.config.image_size)
    if metrics["images"] != n:
        raise RuntimeError(f"scored {metrics['images']} test images, expected {n}")
    return metrics, sums.pixel_bits / sums.images if per_pixel else None


# ---------------------------------------------------------------------------------------------
# The heatmap of where the bits go.

# A few stops of matplotlib's viridis, interpolated linearly: dark = cheap, yellow = expensive.
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                    dtype=np.float64)


def channel_names(channels: int) -> list[str]:
    return {1: ["gray"], 3: ["R", "G", "B"]}.get(channels, [f"c{i}" for i in range(channels)])


def heatmap_image(pixel_bits: Tensor | np.ndarray, min_side: int = 128) -> Image.Image:
    """One panel per channel plus their mean, on a shared colour scale, labelled with bits/dim.
    A clip's (C, T, H, W) shows its frames top to bottom in each panel."""
    bits = torch.as_tensor(pixel_bits).double().cpu().numpy()  # (C, H, W)
    frames = bits.shape[1] if bits.ndim == 4 else 1
    if bits.ndim == 4:  # (C, T, H, W) -> (C, T * H, W), each frame as large as an image's
        bits, min_side = bits.reshape(len(bits), -1, bits.shape[-1]), min_side * frames
    panels = np.stack([*bits, bits.mean(axis=0)])
    # The first pixel of each channel costs ~8 bits (nothing to condition on); a scale that
    # ends at the 99th percentile keeps that one pixel from washing out the others.
    low, high = float(bits.min()), float(np.percentile(bits, 99))
    t = np.clip((panels - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    rgb = [np.interp(t, np.arange(len(_VIRIDIS)), _VIRIDIS[:, k]) for k in range(3)]
    scale = max(1, math.ceil(min_side / max(bits.shape[1:])))
    tiles = np.stack(rgb, axis=-1).round().astype(np.uint8).repeat(scale, 1).repeat(scale, 2)
    (n, h, w, _), pad, text = tiles.shape, 4, 14
    notes = 1 + (frames > 1)  # lines of text below the panels
    canvas = Image.new("RGB", (n * (w + pad) + pad, h + (1 + notes) * text + pad), "white")
    draw = ImageDraw.Draw(canvas)
    labels = [*channel_names(len(bits)), "mean"]
    for k, (tile, panel, label) in enumerate(zip(tiles, panels, labels, strict=True)):
        canvas.paste(Image.fromarray(tile), (pad + k * (w + pad), text))
        draw.text((pad + k * (w + pad), 1), f"{label}: {panel.mean():.3f} bits/dim", fill="black")
    draw.text((pad, text + h + 1), f"scale: {low:.2f} (dark) to {high:.2f}+ (yellow) bits per "
              "subpixel", fill="black")
    if frames > 1:
        draw.text((pad, 2 * text + h + 1), f"frames 1 to {frames}, top to bottom", fill="black")
    return canvas


def save_heatmap(pixel_bits: Tensor | np.ndarray, path: str | Path) -> None:
    atomic_write(path, lambda tmp: heatmap_image(pixel_bits).save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------
# Baselines: what general-purpose lossless codecs spend on the same images, one file per image.

BASELINES = ("png", "webp", "jxl")


def encode_baseline(image: np.ndarray, codec: str) -> bytes:
    """One (H, W, C) uint8 image at the codec's strongest lossless setting."""
    plane = image[..., 0] if image.shape[-1] == 1 else image
    if codec == "jxl":
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(plane, lossless=True, effort=9))
    if codec not in BASELINES:
        raise ValueError(f"codec must be one of {BASELINES}, got {codec!r}")
    options = ({"optimize": True, "compress_level": 9} if codec == "png"
               else {"lossless": True, "quality": 100, "method": 6})
    buffer = io.BytesIO()
    Image.fromarray(plane).save(buffer, format=codec.upper(), **options)
    return buffer.getvalue()


def lossless_bits_per_dim(images: np.ndarray, codec: str, progress: bool = False) -> float:
    """File bytes * 8 / (N * H * W * C) of uint8 images [N, H, W, C], each encoded on its own."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} "
                         f"{list(images.shape)}")
    total = sum(len(encode_baseline(image, codec)) for image in tqdm(
        images, desc=f"{codec} baseline", unit="image", leave=False, disable=not progress,
        dynamic_ncols=True))
    return 8.0 * total / images.size


def codec_baselines(test_set: Dataset, max_images: int = 0, progress: bool = False) -> dict:
    """The codecs' bits/dim over the first `max_images` (0: all) images of `test_set`; of a
    split of clips, over every frame of those clips, each frame encoded as an image of its own
    (these are image codecs: they use no other frame)."""
    n = len(test_set) if max_images == 0 else min(max_images, len(test_set))
    items = [split_batch(test_set[i])[0] for i in range(n)]  # [C, H, W], or clips [C, T, H, W]
    images = np.concatenate([np.moveaxis(item.numpy(), 0, -1).reshape(-1, *item.shape[-2:],
                                                                     len(item))
                             for item in items])  # (N, H, W, C), or (N * T, H, W, C)
    return {f"baseline/{codec}_bpd": lossless_bits_per_dim(images, codec, progress)
            for codec in BASELINES}
