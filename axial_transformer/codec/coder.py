"""Lossless image compression with a trained Axial Transformer: a file takes the model's bits/dim.

    data = compress(model, images)                # integer images [N, C, H, W] -> bytes
    assert torch.equal(decompress(model, data), images.to(torch.uint8))

Each subpixel is range coded (constriction's queue coder) under the model's distribution of it
given everything before it in the model's order, so a file costs the images' exact bits under
the model, plus the coder's last word and the header (codec_format.py).

The decoder must see bit for bit the distribution the encoder saw. Both compute it with the
model in exact arithmetic (exact_model.py): integers whose sums are exact in any order, tables
for exp and the GELU, the range coder's integer frequencies computed in int64. So the
distribution is the same on every CPU and GPU, at every thread count and batch size, under every
torch version: a file decodes wherever the model does, and each image's checksum still stands
guard (docs/codec.md bounds what it has left to catch).

The images are coded in groups of `GROUP_SIZE`: within a group, subpixel after subpixel, the
group's images in turn. How many images the model computes at once (`batch_size`, a divisor of
the group or not) is each side's own choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator

import constriction
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import cpu_speedups
from ..model.transformer import AxialTransformer
from .exact_model import ARITHMETIC_VERSION, ExactAxialTransformer, frequencies
from .format import GROUP_SIZE, LABELS, NAMES, Header, image_crc, pack, unpack

__all__ = ["compress", "decompress", "model_fingerprint"]

# constriction's categorical model, handed integer frequencies n_v summing to 2^24 - V: its
# quantisation (`perfect=False`) then gives each value exactly n_v + 1 of 2^24, with no rounding.
CATEGORICAL = constriction.stream.model.Categorical(perfect=False)

# The configuration the coding distribution depends on (the rest, such as the attention path or
# dropout, changes how a float model computes, not what the exact one does).
ARCHITECTURE = ("image_size", "channels", "dim", "heads", "encoder_layers", "outer_layers",
                "inner_layers", "mlp_ratio", "levels", "num_classes")

# Values chosen for each subpixel of a group [G], given the coder's frequencies [G, V] and,
# when compressing, the known values [G].
Coder = Callable[[Tensor, Tensor], Tensor]


def compress(
    model: AxialTransformer,
    images: Tensor,
    batch_size: int = 64,
    threads: int | None = None,
    progress: bool = False,
    labels: Tensor | None = None,
    names: list[str] | None = None,
) -> bytes:
    """The .axc file of integer `images` [N, C, H, W] under `model` (on its device).

    labels:     a class-conditional model's classes of the images, [N] (-1: none); stored in
                the file, which decodes with them.
    names:      the images' file names, stored for decompress.py to write them back under.
    batch_size: images the model computes at once; the file does not depend on it.
    threads:    CPU threads (default: one below a batch of 8, where more are slower).
    """
    check_model(model)
    model.check_images(images)
    labels = model.check_labels(labels, images)
    if len(images) == 0:
        raise ValueError("no images to compress")
    check_counts(batch_size, threads)
    pixels = images.to(device="cpu", dtype=torch.uint8)
    settings: dict = {}
    if labels is not None:
        settings[LABELS] = labels.tolist()
    if names is not None:
        settings[NAMES] = list(names)
    encoder = constriction.stream.queue.RangeEncoder()

    def encode(counts: Tensor, known: Tensor) -> Tensor:
        encoder.encode(known.cpu().numpy().astype(np.int32), CATEGORICAL,
                       counts.cpu().numpy().astype(np.float64))
        return known

    exact = ExactAxialTransformer(model)
    with coding_mode(batch_size, threads, exact.device), \
            rows_bar(model, len(images), "compressing", progress) as bar:
        for first in range(0, len(pixels), GROUP_SIZE):
            group = pixels[first : first + GROUP_SIZE].to(exact.device, torch.long)
            code_group(exact, group, group_labels(labels, first), batch_size, encode, bar)
    header = Header(
        fingerprint=model_fingerprint(model),
        shape=tuple(images.shape),
        levels=model.config.levels,
        arithmetic=ARITHMETIC_VERSION,
        settings=settings,
        image_crcs=tuple(image_crc(image.numpy().tobytes()) for image in pixels),
    )
    return pack(header, encoder.get_compressed().astype("<u4").tobytes())


def decompress(model: AxialTransformer, data: bytes, batch_size: int = 64,
               threads: int | None = None, progress: bool = False) -> Tensor:
    """The images of an .axc file -> uint8 [N, C, H, W] on the CPU, exactly as compressed, at
    any `batch_size` and thread count; a ValueError for a file of another format, version or
    model, a damaged one, or pixels that do not decode exactly."""
    header, payload = unpack(bytes(data))
    check_model(model)
    check_same_model(model, header)
    check_counts(batch_size, threads)
    n, c, h, w = header.shape
    exact = ExactAxialTransformer(model)
    labels = header.settings.get(LABELS)
    labels = None if labels is None else torch.tensor(labels, device=exact.device)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4"))

    def decode(counts: Tensor, known: Tensor) -> Tensor:
        try:
            values = decoder.decode(CATEGORICAL, counts.cpu().numpy().astype(np.float64))
        except AssertionError:  # constriction's word for a payload its models cannot decode
            raise ValueError(NOT_EXACT.format(image="an image")) from None
        return torch.from_numpy(values.astype(np.int64)).to(known.device)

    groups = []
    with coding_mode(batch_size, threads, exact.device), \
            rows_bar(model, n, "decompressing", progress) as bar:
        for first in range(0, n, GROUP_SIZE):
            # One group at a time: what is allocated grows with the images actually decoded.
            group = torch.zeros((min(GROUP_SIZE, n - first), c, h, w), dtype=torch.long,
                                device=exact.device)
            code_group(exact, group, group_labels(labels, first), batch_size, decode, bar)
            group = group.to("cpu", torch.uint8)
            check_pixels(group, header.image_crcs[first:], first)
            groups.append(group)
    return torch.cat(groups)


def code_group(exact: ExactAxialTransformer, x: Tensor, labels: Tensor | None,
               batch_size: int, coder: Coder, bar: tqdm) -> None:
    """Run the coding distribution over one group x [G, C, H, W] (long, on the model's device)
    in the model's order, filling x in place with the values `coder` gives for each subpixel of
    the G images in turn. The model runs on lanes of `batch_size` images, side by side: an
    image's arithmetic does not depend on its lane, so neither does the file.

      per channel c:   ctx = channel_encoder(x[<c])                          once
      per row i:       u[i] = outer_step(row i-1), masked column layers cached over rows
      per column j:    x[c, i, j] = code(inner_step(h[i, j-1] + u[i] + pos[i] + ctx[i]))
    """
    g, channels, height, width = x.shape
    lanes = [slice(k, min(k + batch_size, g)) for k in range(0, g, batch_size)]
    caches = [exact.new_caches(lane.stop - lane.start) for lane in lanes]
    embed, pos = exact.pixel_embedding, exact.positions()  # [levels, D], [H, W, D]
    for c in range(channels):
        ctx = [exact.channel_context(x[lane], c, group_labels(labels, lane.start, lane.stop))
               for lane in lanes]
        u = [pos.new_zeros((lane.stop - lane.start, width, pos.shape[-1])) for lane in lanes]
        for i in range(height):
            bar.update()
            if i > 0:
                u = [exact.outer_step(embed[x[lane, c, i - 1]] + pos[i - 1] + ctx_k[:, i - 1],
                                      outer, i - 1)
                     for lane, ctx_k, (outer, _) in zip(lanes, ctx, caches, strict=True)]
            row_inputs = [u_k + pos[i] + ctx_k[:, i] for u_k, ctx_k in zip(u, ctx, strict=True)]
            left = [pos.new_zeros((lane.stop - lane.start, pos.shape[-1])) for lane in lanes]
            for j in range(width):
                logits = torch.cat([
                    exact.inner_step(left_k + row_k[:, j], inner, j)
                    for left_k, row_k, (_, inner) in zip(left, row_inputs, caches, strict=True)])
                values = coder(frequencies(logits, exact.tables.exp), x[:, c, i, j])
                x[:, c, i, j] = values
                left = [embed[values[lane]] for lane in lanes]


def group_labels(labels: Tensor | None, first: int, stop: int | None = None) -> Tensor | None:
    return None if labels is None else labels[first : first + GROUP_SIZE if stop is None
                                              else stop]


NOT_EXACT = ("{image} does not decode to the pixels that were compressed (its checksum "
             "differs): the file's payload or labels were changed after it was written, with "
             "its closing checksum recomputed")


def check_counts(batch_size: int, threads: int | None) -> None:
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_model(model: AxialTransformer) -> None:
    """The codec stores 8-bit pixels and runs on a CPU or a CUDA GPU."""
    if model.config.levels > 256:
        raise ValueError(f"the codec stores 8-bit pixels (levels <= 256), the model has "
                         f"{model.config.levels} levels")
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the codec runs the model on a CPU or a CUDA GPU, not on {device}")


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
    conditional = model.config.num_classes > 0
    if conditional != (LABELS in header.settings):
        raise ValueError("the file holds no labels, and this model is class-conditional"
                         if conditional else
                         "the file holds labels, and this model is not class-conditional")
    labels = header.settings.get(LABELS, [])
    if labels and max(labels) >= model.config.num_classes:
        raise ValueError(f"the file's labels go up to {max(labels)}; this model has "
                         f"{model.config.num_classes} classes")


def check_pixels(images: Tensor, crcs: tuple[int, ...], first: int) -> None:
    """Each decoded image must match the checksum of the image that was compressed."""
    for k, image in enumerate(images):
        if image_crc(image.numpy().tobytes()) != crcs[k]:
            raise ValueError(NOT_EXACT.format(image=f"image {first + k}"))


def model_fingerprint(model: AxialTransformer) -> bytes:
    """SHA-256 of the model's architecture (JSON, sorted keys) and of its weights' bytes, tensor
    by tensor in the order of their names, each after its name, dtype and shape."""
    config = model.config.to_dict()
    digest = hashlib.sha256(json.dumps({k: config[k] for k in ARCHITECTURE},
                                       sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


@contextlib.contextmanager
def coding_mode(batch_size: int, threads: int | None, device: torch.device) -> Iterator[None]:
    """No autograd, and the thread count of a decoding loop (one below a batch of 8, where more
    are slower) unless given: the results do not depend on it. Restores it."""
    saved = torch.get_num_threads()
    try:
        with torch.inference_mode(), cpu_speedups.decoding_threads(batch_size, device):
            if threads is not None:
                torch.set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(saved)


def rows_bar(model: AxialTransformer, images: int, desc: str, progress: bool) -> tqdm:
    """One progress bar over every row of every group."""
    groups = -(-images // GROUP_SIZE)
    total = groups * model.config.channels * model.config.image_size[0]
    return tqdm(total=total, unit="row", desc=desc, disable=not progress)
