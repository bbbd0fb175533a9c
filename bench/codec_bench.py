"""Lossless compression of the built-in test split: the model's codec against PNG and WebP.

    python bench/codec_bench.py                          # the demo model, runs/demo
    python bench/codec_bench.py --checkpoint runs/mine   # any model of the split's image size

Without --checkpoint the demo model is used, trained first by `python train.py` if runs/demo
has none. Prints a markdown table: file bits/dim (header included) beside the model's exact
bits/dim (teacher-forced, fp32), PNG (optimize) and WebP lossless (method 6) per image and as
one mosaic of all test images, and encode and decode images/s for each, the codec at batch 64
(the whole split) and batch 1 (the first --batch1-images images), beside sampling at batch 64
with the same model. Then the targets: files at most 0.5% above the exact bits plus the
header, smaller than WebP's, and decoding at batch 64 at least half as fast as sampling.
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
from machine import cpu_model
from PIL import Image

from axial_transformer.codec import compress, decompress
from axial_transformer.codec_format import unpack
from axial_transformer.data import open_split
from axial_transformer.evaluation import lossless_bits_per_dim
from axial_transformer.sampling import sample
from axial_transformer.training import load_trained_model

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


def ours(model, images: torch.Tensor, batch_size: int) -> tuple[bytes, float, float]:
    """(file, encode images/s, decode images/s) of the codec, checked to be lossless."""
    start = time.perf_counter()
    data = compress(model, images, batch_size=batch_size)
    encoding = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decompress(model, data)
    decoding = time.perf_counter() - start
    assert torch.equal(decoded, images), "the codec is not lossless"
    return data, len(images) / encoding, len(images) / decoding


def sampling_rate(model, batch_size: int) -> float:
    """Images/s of `sample(model, batch_size)`, the best of two calls."""
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        sample(model, batch_size)
        best = min(best, time.perf_counter() - start)
    return batch_size / best


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
    parser.add_argument("--batch1-images", type=int, default=32,
                        help="images coded one at a time for the batch-1 rates")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_model()
    model, _ = load_trained_model(checkpoint)
    model.eval()
    c, (h, w) = model.config.channels, model.config.image_size
    array = np.asarray(open_split("builtin", "test", (h, w), c).array)  # [N, H, W, C]
    images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    n = len(images)

    exact = exact_bits_per_dim(model, images)
    data, encode64, decode64 = ours(model, images, 64)
    _, payload = unpack(data)
    header_bytes = len(data) - len(payload)
    file_bpd, payload_bpd = 8 * len(data) / images.numel(), 8 * len(payload) / images.numel()
    first = images[: args.batch1_images]
    data1, encode1, decode1 = ours(model, first, 1)
    file1_bpd = 8 * len(data1) / first.numel()
    sampled = sampling_rate(model, 64)
    png, webp = baseline(array, "PNG"), baseline(array, "WEBP")
    png_mosaic, webp_mosaic = mosaic_baseline(array, "PNG"), mosaic_baseline(array, "WEBP")

    rows, cols = mosaic(array).shape[0] // h, mosaic(array).shape[1] // w
    command = " ".join(["python", "bench/codec_bench.py", *sys.argv[1:]])
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# Codec benchmark: `{command}`, {date}")
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(the codec: {torch.get_num_threads()} at batch 64, 1 at batch 1, as the sampler)")
    print(f"# model {checkpoint} ({model.num_parameters():,} parameters); built-in test split, "
          f"{n} images of {c}x{h}x{w}\n")
    print("| codec | bits/dim | vs exact | encode images/s | decode images/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| model's exact bits/dim (teacher-forced, fp32) | {exact:.4f} | | | |")
    print(f"| ours, batch 64: file ({header_bytes:,} bytes of header) | {file_bpd:.4f} | "
          f"{100 * (file_bpd / exact - 1):+.2f}% | {encode64:.1f} | {decode64:.1f} |")
    print(f"| ours, batch 64: payload | {payload_bpd:.4f} | {100 * (payload_bpd / exact - 1):+.3f}%"
          " | | |")
    print(f"| ours, batch 1 (first {len(first)} images, file) | {file1_bpd:.4f} | | "
          f"{encode1:.1f} | {decode1:.1f} |")
    print(f"| sampling, batch 64 (`sample(model, 64)`) | | | | {sampled:.1f} (drawn) |")
    for name, (bpd, enc, dec) in [("PNG (optimize), per image", png),
                                  (f"PNG (optimize), one {rows}x{cols} mosaic", png_mosaic),
                                  ("WebP lossless (method 6), per image", webp),
                                  (f"WebP lossless (method 6), one {rows}x{cols} mosaic",
                                   webp_mosaic)]:
        print(f"| {name} | {bpd:.4f} | {100 * (bpd / exact - 1):+.1f}% | {enc:.0f} | {dec:.0f} |")

    webp_check = lossless_bits_per_dim(array, "webp")
    assert abs(webp_check - webp[0]) < 1e-9, "the WebP settings differ from evaluation's"
    overhead = payload_bpd / exact - 1
    print("\n# targets")
    print(f"# file at most 0.5% above the exact bits, plus the header ({header_bytes:,} bytes): "
          f"payload {100 * overhead:+.3f}%: {'met' if overhead <= 0.005 else 'NOT met'}")
    print(f"# smaller than WebP lossless: {file_bpd:.3f} vs {webp[0]:.3f} bits/dim per image, "
          f"{webp_mosaic[0]:.3f} as a mosaic: {'met' if file_bpd < webp[0] else 'NOT met'}")
    ratio = decode64 / sampled
    print(f"# decoding at batch 64 at least half as fast as sampling at batch 64: {decode64:.1f} "
          f"vs {sampled:.1f} images/s ({ratio:.2f}x): {'met' if ratio >= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
