"""Lossless compression of the built-in test split: the model's codec against PNG and WebP.

    python bench/codec_bench.py                          # the demo model, runs/demo
    python bench/codec_bench.py --checkpoint runs/mine   # any model of the split's image size

Without --checkpoint the demo model is used, trained first by `python train.py` if runs/demo
has none. Prints a markdown table: file bits/dim (header included) beside the model's exact
bits/dim (teacher-forced, fp32) for the whole split coded at batch 64 and its first
--batch1-images coded one at a time, PNG (optimize) and WebP lossless (method 6) per image and
as one mosaic of all test images, and encode and decode images/s: the codec's as the best of 3
rounds over one batch of 64 (taken in turn with `sample(model, 64)`, so that a shared machine's
slow spells fall on both) and of 2 rounds at batch 1; PNG's and WebP's over the whole split,
one image at a time. Then the targets: files at most 0.5% above the exact bits plus the header,
smaller than WebP's, decoding at batch 64 at least half as fast as sampling at batch 64.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_line, sampler_precision
from PIL import Image

from axial_transformer.checkpoint import load_trained_model
from axial_transformer.codec import compress, decompress
from axial_transformer.codec_format import unpack
from axial_transformer.data import open_split
from axial_transformer.evaluation import lossless_bits_per_dim
from axial_transformer.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = ROOT / "runs" / "demo"

# The baselines at their strongest lossless settings, as evaluation.lossless_bits_per_dim.
SAVE_OPTIONS = {"PNG": dict(optimize=True, compress_level=9),
                "WEBP": dict(lossless=True, quality=100, method=6)}


def demo_model() -> Path:
    """runs/demo, trained by `python train.py` if it holds no export yet."""
    if not (DEMO_RUN / "export" / "config.json").is_file():
        print(f"# {DEMO_RUN} has no model: training it with python train.py", flush=True)
        subprocess.run([sys.executable, "train.py"], cwd=ROOT, check=True)
    return DEMO_RUN


def mosaic(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> one [rows * H, cols * W, C] image, rows the largest divisor of N up to
    sqrt(N): every tile an image, no padding."""
    n, h, w, c = images.shape
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    tiles = images.reshape(rows, n // rows, h, w, c)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * h, n // rows * w, c)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        buffer, format=fmt, **SAVE_OPTIONS[fmt])
    return buffer.getvalue()


def baseline(images: np.ndarray, fmt: str) -> tuple[float, float, float]:
    """(bits/dim, encode images/s, decode images/s) of `fmt` on each image on its own, decoded
    and checked to be lossless."""
    start = time.perf_counter()
    files = [encode(image, fmt) for image in images]
    encoding = time.perf_counter() - start
    start = time.perf_counter()
    decoded = np.stack([np.array(Image.open(io.BytesIO(f))) for f in files])
    decoding = time.perf_counter() - start
    assert np.array_equal(decoded.reshape(images.shape), images), f"{fmt} is not lossless"
    return 8 * sum(map(len, files)) / images.size, len(images) / encoding, len(images) / decoding


def mosaic_baseline(images: np.ndarray, fmt: str) -> tuple[float, float, float]:
    """(bits/dim, encode images/s, decode images/s) of `fmt` on one mosaic of all images."""
    tiled = mosaic(images)
    start = time.perf_counter()
    data = encode(tiled, fmt)
    encoding = time.perf_counter() - start
    start = time.perf_counter()
    decoded = np.array(Image.open(io.BytesIO(data)))
    decoding = time.perf_counter() - start
    assert np.array_equal(decoded.reshape(tiled.shape), tiled), f"{fmt} is not lossless"
    return 8 * len(data) / images.size, len(images) / encoding, len(images) / decoding


def ours(model, images: torch.Tensor, batch_size: int) -> bytes:
    """The codec's file of the images, checked to decode to them."""
    data = compress(model, images, batch_size=batch_size)
    assert torch.equal(decompress(model, data), images), "the codec is not lossless"
    return data


def best_seconds(calls: dict, repeats: int) -> dict:
    """The best wall time of each call over `repeats` rounds, the calls taken in turn within a
    round, so that a shared machine's slow spells fall on all of them alike."""
    best = dict.fromkeys(calls, math.inf)
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def rates(model, images: torch.Tensor, batch_size: int, repeats: int,
          with_sampling: bool = False) -> dict:
    """Images/s of the codec's encoding and decoding of `images` at `batch_size`, and of
    `sample(model, batch_size)` in the same rounds if asked."""
    data = compress(model, images, batch_size=batch_size)
    calls = {"encode": lambda: compress(model, images, batch_size=batch_size),
             "decode": lambda: decompress(model, data)}
    if with_sampling:
        calls["sample"] = lambda: sample(model, batch_size)
    seconds = best_seconds(calls, repeats)
    counts = {"encode": len(images), "decode": len(images), "sample": batch_size}
    return {name: counts[name] / t for name, t in seconds.items()}


def exact_bits_per_dim(model, images: torch.Tensor) -> float:
    """The model's exact bits/dim of the images, teacher-forced in fp32."""
    with torch.inference_mode():
        bits = sum(model.subpixel_bits(batch).double().sum().item()
                   for batch in images.split(64))
    return bits / images.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run, checkpoint or export directory (default: "
                        "runs/demo, trained if missing)")
    parser.add_argument("--batch1-images", type=int, default=16,
                        help="images coded one at a time for the batch-1 figures")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_model()
    model, _ = load_trained_model(checkpoint)
    model.eval()
    c, (h, w) = model.config.channels, model.config.image_size
    array = np.asarray(open_split("builtin", "test", (h, w), c).array)  # [N, H, W, C]
    images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    n = len(images)

    exact = exact_bits_per_dim(model, images)
    data = ours(model, images, 64)
    _, payload = unpack(data)
    header_bytes = len(data) - len(payload)
    file_bpd, payload_bpd = 8 * len(data) / images.numel(), 8 * len(payload) / images.numel()
    first = images[: args.batch1_images]
    file1_bpd = 8 * len(ours(model, first, 1)) / first.numel()
    exact1 = exact_bits_per_dim(model, first)
    speed64 = rates(model, images[:64], 64, repeats=3, with_sampling=True)
    speed1 = rates(model, first, 1, repeats=2)
    png, webp = baseline(array, "PNG"), baseline(array, "WEBP")
    png_mosaic, webp_mosaic = mosaic_baseline(array, "PNG"), mosaic_baseline(array, "WEBP")

    rows = mosaic(array).shape[0] // h
    cols = n // rows
    command = " ".join(["python", "bench/codec_bench.py", *sys.argv[1:]])
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# Codec benchmark: `{command}`, {date}")
    precision = f"fp32 in the codec, {sampler_precision()} in the sampler"
    print(f"# {machine_line(precision)} (the codec: {torch.get_num_threads()} threads at batch "
          "64, 1 at batch 1, as the sampler)")
    print(f"# model {checkpoint} ({model.num_parameters():,} parameters); built-in test split, "
          f"{n} images of {c}x{h}x{w}\n")
    print("| codec | bits/dim | vs exact | encode images/s | decode images/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| model's exact bits/dim (teacher-forced, fp32) | {exact:.4f} | | | |")
    print(f"| ours, batch 64: file ({header_bytes:,} bytes of header) | {file_bpd:.4f} | "
          f"{100 * (file_bpd / exact - 1):+.2f}% | {speed64['encode']:.1f} | "
          f"{speed64['decode']:.1f} |")
    print(f"| ours, batch 64: payload | {payload_bpd:.4f} | {100 * (payload_bpd / exact - 1):+.3f}%"
          " | | |")
    print(f"| ours, batch 1: file of the first {len(first)} images (exact {exact1:.4f}) | "
          f"{file1_bpd:.4f} | {100 * (file1_bpd / exact1 - 1):+.2f}% | {speed1['encode']:.1f} | "
          f"{speed1['decode']:.1f} |")
    print(f"| sampling, batch 64: `sample(model, 64)` | | | | {speed64['sample']:.1f} (drawn) |")
    for name, (bpd, enc, dec) in [("PNG (optimize), per image", png),
                                  (f"PNG (optimize), one {rows}x{cols} mosaic", png_mosaic),
                                  ("WebP lossless (method 6), per image", webp),
                                  (f"WebP lossless (method 6), one {rows}x{cols} mosaic",
                                   webp_mosaic)]:
        print(f"| {name} | {bpd:.4f} | {100 * (bpd / exact - 1):+.1f}% | {enc:.0f} | {dec:.0f} |")

    webp_check = lossless_bits_per_dim(array, "webp")
    assert abs(webp_check - webp[0]) < 1e-9, "the WebP settings differ from evaluation's"
    overhead = payload_bpd / exact - 1
    verdict = {True: "met", False: "NOT met"}
    print("\n# targets")
    print(f"# file at most 0.5% above the exact bits, plus the header ({header_bytes:,} bytes): "
          f"payload {100 * overhead:+.3f}%: {verdict[overhead <= 0.005]}")
    print(f"# smaller than WebP lossless: {file_bpd:.3f} bits/dim vs {webp[0]:.3f} per image: "
          f"{verdict[file_bpd < webp[0]]}; vs {webp_mosaic[0]:.3f} as one mosaic: "
          f"{verdict[file_bpd < webp_mosaic[0]]}")
    ratio = speed64["decode"] / speed64["sample"]
    print(f"# decoding at batch 64 at least half as fast as sampling at batch 64: "
          f"{speed64['decode']:.1f} vs {speed64['sample']:.1f} images/s ({ratio:.2f}x): "
          f"{verdict[ratio >= 0.5]}")


if __name__ == "__main__":
    main()
