"""Lossless image compression with a trained Axial Transformer: a file takes the model's bits/dim.

Each subpixel is range coded (constriction's queue coder) under the model's distribution of it
given everything before it, computed in exact arithmetic (exact_model.py): the same bits on every
CPU and GPU, at every thread count and batch size (docs/codec.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from collections.abc import Callable, Iterator

import constriction
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import cpu_speedups
from ..model.transformer import AxialTransformer
from .exact_model import ARITHMETIC_VERSION, ExactAxialTransformer, frequencies
from .format import GROUP_SIZE, LABELS, NAMES, Header, pack, unpack

__all__ = ["compress", "decompress", "model_fingerprint"]

# Handed integer frequencies n_v summing to 2^24 - V, constriction's quantisation
# (`perfect=False`) gives each value exactly n_v + 1 of 2^24, with no rounding.
CATEGORICAL = constriction.stream.model.Categorical(perfect=False)

# What the coding distribution depends on (the attention path or dropout change how a float
# model computes, not what the exact one does).
ARCHITECTURE = ("image_size", "channels", "dim", "heads", "encoder_layers", "outer_layers",
                "inner_layers", "mlp_ratio", "levels", "num_classes")

NOT_EXACT = ("{image} does not decode to the pixels that were compressed (its checksum "
             "differs): the file's payload or labels were changed after it was written, with "
             "its closing checksum recomputed")


def compress(model: AxialTransformer, images: Tensor, batch_size: int = 64,
             threads: int | None = None, progress: bool = False, labels: Tensor | None = None,
             names: list[str] | None = None) -> bytes:
    """The .axc file of integer `images` [N, C, H, W] under `model` (on its device). `labels`
    (a class-conditional model's classes [N], -1: none) and `names` (file names) are kept in the
    file. Neither `batch_size` (images computed at once) nor `threads` changes the file."""
    model.check_images(images)
    labels = model.check_labels(labels, images)
    if len(images) == 0:
        raise ValueError("no images to compress")
    pixels = images.to(device="cpu", dtype=torch.uint8)
    settings = {} if labels is None else {LABELS: labels.tolist()}
    if names is not None:
        settings[NAMES] = list(names)
    encoder = constriction.stream.queue.RangeEncoder()

    def encode(counts: Tensor, known: Tensor) -> Tensor:
        encoder.encode(known.cpu().numpy().astype(np.int32), CATEGORICAL,
                       counts.cpu().numpy().astype(np.float64))
        return known

    with coding(model, len(images), batch_size, threads, "compressing", progress) as bar:
        exact = ExactAxialTransformer(model)
        classes = (torch.full((len(images),), -1) if labels is None else labels).to(exact.device)
        for first in range(0, len(pixels), GROUP_SIZE):
            group = pixels[first : first + GROUP_SIZE].to(exact.device, torch.long)
            code_group(exact, group, classes[first : first + GROUP_SIZE], batch_size, encode, bar)
    crcs = tuple(zlib.crc32(image.numpy().tobytes()) for image in pixels)
    header = Header(model_fingerprint(model), tuple(images.shape), model.config.levels,
                    ARITHMETIC_VERSION, settings, crcs)
    return pack(header, encoder.get_compressed().astype("<u4").tobytes())


def decompress(model: AxialTransformer, data: bytes, batch_size: int = 64,
               threads: int | None = None, progress: bool = False) -> Tensor:
    """The images of an .axc file -> uint8 [N, C, H, W] on the CPU, exactly as compressed; a
    ValueError for a file of another format, version or model, a damaged one, or pixels that do
    not decode exactly."""
    header, payload = unpack(bytes(data))
    check_same_model(model, header)
    n, c, h, w = header.shape
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4"))

    def decode(counts: Tensor, known: Tensor) -> Tensor:
        try:
            values = decoder.decode(CATEGORICAL, counts.cpu().numpy().astype(np.float64))
        except AssertionError:  # constriction's word for a payload its models cannot decode
            raise ValueError(NOT_EXACT.format(image="an image")) from None
        return torch.from_numpy(values.astype(np.int64)).to(known.device)

    groups = []
    with coding(model, n, batch_size, threads, "decompressing", progress) as bar:
        exact = ExactAxialTransformer(model)
        classes = torch.tensor(header.settings.get(LABELS, [-1] * n), device=exact.device)
        for first in range(0, n, GROUP_SIZE):
            # One group at a time: what is allocated grows with the images actually decoded.
            group = torch.zeros((min(GROUP_SIZE, n - first), c, h, w), dtype=torch.long,
                                device=exact.device)
            code_group(exact, group, classes[first : first + GROUP_SIZE], batch_size, decode, bar)
            groups.append(group.to("cpu", torch.uint8))
            check_pixels(groups[-1], header.image_crcs[first:], first)
    return torch.cat(groups)


def code_group(exact: ExactAxialTransformer, x: Tensor, labels: Tensor, batch_size: int,
               coder: Callable[[Tensor, Tensor], Tensor], bar: tqdm) -> None:
    """Fill x [G, C, H, W] (long) in the model's order with the values `coder(frequencies [G, V],
    known [G])` gives each subpixel of the G images in turn. The model runs on lanes of
    `batch_size` images: an image's arithmetic, so the file, does not depend on its lane.

      per channel c:   ctx = channel_encoder(x[<c])                          once
      per row i:       u[i] = outer_step(row i-1), masked column layers cached over rows
      per column j:    x[c, i, j] = code(inner_step(h[i, j-1] + u[i] + pos[i] + ctx[i]))
    """
    g, channels, height, width = x.shape
    lanes = [slice(k, min(k + batch_size, g)) for k in range(0, g, batch_size)]
    outer, inner = zip(*(exact.new_caches(lane.stop - lane.start) for lane in lanes), strict=True)
    embed, pos = exact.pixel_embedding, exact.positions  # [levels, D], [H, W, D]
    for c in range(channels):
        ctx = torch.cat([exact.channel_context(x[lane], c, labels[lane]) for lane in lanes])
        u = pos.new_zeros((g, width, pos.shape[-1]))
        for i in range(height):
            bar.update()
            if i > 0:
                above = embed[x[:, c, i - 1]] + pos[i - 1] + ctx[:, i - 1]
                u = torch.cat([exact.outer_step(above[lane], outer_k, i - 1)
                               for lane, outer_k in zip(lanes, outer, strict=True)])
            row = u + pos[i] + ctx[:, i]
            left = pos.new_zeros((g, pos.shape[-1]))
            for j in range(width):
                inputs = left + row[:, j]
                logits = torch.cat([exact.inner_step(inputs[lane], inner_k, j)
                                    for lane, inner_k in zip(lanes, inner, strict=True)])
                x[:, c, i, j] = values = coder(frequencies(logits, exact.exp), x[:, c, i, j])
                left = embed[values]


@contextlib.contextmanager
def coding(model: AxialTransformer, images: int, batch_size: int, threads: int | None,
           desc: str, progress: bool) -> Iterator[tqdm]:
    """The run's settings checked, then: no autograd; `threads` CPU threads (by default one below
    a batch of 8, where more are slower), restored after; a progress bar over every group's rows."""
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if model.config.levels > 256:
        raise ValueError(f"the codec stores 8-bit pixels (levels <= 256), the model has "
                         f"{model.config.levels} levels")
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the codec runs the model on a CPU or a CUDA GPU, not on {device}")
    rows = -(-images // GROUP_SIZE) * model.config.channels * model.config.image_size[0]
    with torch.inference_mode(), cpu_speedups.decoding_threads(batch_size, device), \
            tqdm(total=rows, unit="row", desc=desc, disable=not progress) as bar:
        if threads is not None:
            torch.set_num_threads(threads)
        yield bar


def check_same_model(model: AxialTransformer, header: Header) -> None:
    """The file must come from this model, under this arithmetic, with labels exactly when the
    model is class-conditional."""
    c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
    if header.shape[1:] != (c, h, w) or header.levels != levels:
        shape = "x".join(map(str, header.shape[1:]))
        raise ValueError(f"the file holds images of {shape} with {header.levels} levels; this "
                         f"model's are {c}x{h}x{w} with {levels}")
    fingerprint = model_fingerprint(model)
    if fingerprint != header.fingerprint:
        raise ValueError(f"the file was compressed with another model (fingerprint "
                         f"{header.fingerprint.hex()[:16]}, this model's "
                         f"{fingerprint.hex()[:16]}): decompress it with that model")
    if header.arithmetic != ARITHMETIC_VERSION:
        raise ValueError(f"the file was coded under arithmetic version {header.arithmetic}; "
                         f"this version of the toolkit computes version {ARITHMETIC_VERSION}")
    labels, classes = header.settings.get(LABELS), model.config.num_classes
    if (labels is None) == (classes > 0):
        raise ValueError("the file holds no labels, and this model is class-conditional"
                         if classes else
                         "the file holds labels, and this model is not class-conditional")
    if labels and max(labels) >= classes:
        raise ValueError(f"the file's labels go up to {max(labels)}; this model has {classes} "
                         "classes")


def check_pixels(images: Tensor, crcs: tuple[int, ...], first: int) -> None:
    for k, image in enumerate(images):
        if zlib.crc32(image.numpy().tobytes()) != crcs[k]:
            raise ValueError(NOT_EXACT.format(image=f"image {first + k}"))


def model_fingerprint(model: AxialTransformer) -> bytes:
    """SHA-256 of the architecture (JSON, sorted keys), then of each weight tensor in the order
    of their names: name, dtype, shape, bytes."""
    config = model.config.to_dict()
    digest = hashlib.sha256(json.dumps({k: config[k] for k in ARCHITECTURE},
                                       sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()
