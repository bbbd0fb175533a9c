"""Lossless image compression with a trained Axial Transformer: a file takes the model's bits/dim.

    data = compress(model, images)                # integer images [N, C, H, W] -> bytes
    assert torch.equal(decompress(model, data), images.to(torch.uint8))

Each subpixel is range coded (constriction's queue coder) under the model's distribution of it
given everything before it in the model's order, so a file costs the images' exact bits under
the model, plus the coder's last word and the header (codec_format.py).

The decoder must see bit for bit the probabilities the encoder saw, or it decodes garbage. Both
compute them through ONE code path, `decoding.decode`, the loop of the model's cached decoding
steps that the sampler runs: the encoder with every pixel known, the decoder taking each value
from the range decoder where the sampler takes a Gumbel-max draw. Both run the same batches of
the same images, in fp32 without autocast or compilation, on the same kind of device with the
same number of CPU threads (recorded in the file), and constriction quantises the probabilities
the same way on both sides (`Categorical(perfect=False)`). What no setting can pin down (another
CPU, another torch) is caught by each image's checksum: a file decodes exactly or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

import constriction
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import cpu_speedups
from .codec_format import LABELS, Header, image_crc, pack, unpack
from .decoding import decode
from .model import AxialTransformer

__all__ = ["compress", "decompress", "model_fingerprint"]

# Each subpixel's own categorical distribution, quantised by constriction from its float
# probabilities in one deterministic pass (perfect=True would search for the closest
# quantisation, far more slowly); every value keeps a nonzero probability, so any pixel codes.
CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def compress(
    model: AxialTransformer,
    images: Tensor,
    batch_size: int = 64,
    threads: int | None = None,
    progress: bool = False,
    labels: Tensor | None = None,
) -> bytes:
    """The .axc file of integer `images` [N, C, H, W] under `model` (fp32, on its device).

    labels:     a class-conditional model's classes of the images, [N] (-1: none); stored in
                the file, which decodes with them.
    batch_size: images coded at once; decoding runs the same batches.
    threads:    CPU threads for the model, recorded for decoding (default: the sampler's choice,
                one below a batch of 8, where more threads are slower, otherwise torch's).
    """
    check_model(model)
    model.check_images(images)
    labels = model.check_labels(labels, images)
    if len(images) == 0:
        raise ValueError("no images to compress")
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = next(model.parameters()).device
    if threads is None:
        small = cpu_speedups.matrix_vector_steps(batch_size, device)
        threads = 1 if small else torch.get_num_threads()
    pixels = images.to(device="cpu", dtype=torch.uint8)
    encoder = constriction.stream.queue.RangeEncoder()
    with coding_mode(model, threads), rows_bar(model, len(images), batch_size, "compressing",
                                               progress) as bar:
        for first, batch in zip(range(0, len(pixels), batch_size), pixels.split(batch_size),
                                strict=True):
            decode(model, batch.to(device, torch.long), Encoding(encoder, bar),
                   batch_labels(labels, first, len(batch)))
    settings = dict(batch_size=batch_size, device=device.type, threads=threads)
    if labels is not None:
        settings[LABELS] = labels.tolist()
    header = Header(
        fingerprint=model_fingerprint(model),
        shape=tuple(images.shape),
        levels=model.config.levels,
        settings=settings,
        image_crcs=tuple(image_crc(image.numpy().tobytes()) for image in pixels),
    )
    return pack(header, encoder.get_compressed().astype("<u4").tobytes())


def decompress(model: AxialTransformer, data: bytes, progress: bool = False) -> Tensor:
    """The images of an .axc file -> uint8 [N, C, H, W] on the CPU, exactly as compressed; a
    ValueError for a file of another format or model, a damaged one, or pixels that do not
    decode exactly."""
    header, payload = unpack(bytes(data))
    check_model(model)
    check_same_model(model, header)
    n, c, h, w = header.shape
    batch_size, threads = header.settings["batch_size"], header.settings["threads"]
    device = next(model.parameters()).device
    labels = header.settings.get(LABELS)  # there for a class-conditional model (fingerprinted)
    labels = None if labels is None else torch.tensor(labels, device=device)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4"))
    batches = []
    with coding_mode(model, threads), rows_bar(model, n, batch_size, "decompressing",
                                               progress) as bar:
        for first in range(0, n, batch_size):
            x = torch.zeros((min(batch_size, n - first), c, h, w), dtype=torch.long,
                            device=device)
            x = decode(model, x, Decoding(decoder, bar), batch_labels(labels, first, len(x)))
            batches.append(x.to("cpu", torch.uint8))
    images = torch.cat(batches)
    check_pixels(images, header)
    return images


def batch_labels(labels: Tensor | None, first: int, size: int) -> Tensor | None:
    return None if labels is None else labels[first : first + size]


def probabilities(logits: Tensor) -> np.ndarray:
    """[B, V] logits -> [B, V] float32 probabilities for the coder: one function for both sides."""
    return logits.float().softmax(-1).cpu().numpy()


class Encoding:
    """`decode`'s choice when compressing: every pixel is known; each goes into the range coder
    under its probabilities, and stays what it is."""

    def __init__(self, encoder: constriction.stream.queue.RangeEncoder, bar: tqdm) -> None:
        self.encoder, self.bar = encoder, bar

    def start_row(self, channel: int, row: int) -> None:
        self.bar.update()

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        values = x_row.index_select(1, column.view(1))[:, 0]  # a copy: decode writes it back
        self.encoder.encode(values.cpu().numpy().astype(np.int32), CATEGORICAL,
                            probabilities(logits))
        return values


class Decoding:
    """`decode`'s choice when decompressing: each value comes from the range decoder under the
    probabilities the encoder used for it."""

    def __init__(self, decoder: constriction.stream.queue.RangeDecoder, bar: tqdm) -> None:
        self.decoder, self.bar = decoder, bar

    def start_row(self, channel: int, row: int) -> None:
        self.bar.update()

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        try:
            values = self.decoder.decode(CATEGORICAL, probabilities(logits))
        except AssertionError:  # constriction's word for a payload its models cannot decode
            raise ValueError(NOT_EXACT) from None
        return torch.from_numpy(values.astype(np.int64)).to(x_row.device)


NOT_EXACT = ("the images do not decode exactly: this machine computes the model's probabilities "
             "differently from the one that compressed them (another CPU or torch version?)")


def check_model(model: AxialTransformer) -> None:
    """The codec runs the model in fp32 and returns uint8 pixels."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"the codec runs the model in float32, got {sorted(map(str, dtypes))} "
                         "weights: call model.float() first")
    if model.config.levels > 256:
        raise ValueError(f"the codec stores 8-bit pixels (levels <= 256), the model has "
                         f"{model.config.levels} levels")


def check_same_model(model: AxialTransformer, header: Header) -> None:
    """The file must come from this model, on this kind of device."""
    fingerprint = model_fingerprint(model)
    if fingerprint != header.fingerprint:
        raise ValueError(f"the file was compressed with another model (fingerprint "
                         f"{header.fingerprint.hex()[:16]}, this model's "
                         f"{fingerprint.hex()[:16]}): decompress it with that model")
    device = next(model.parameters()).device.type
    if device != header.settings["device"]:
        raise ValueError(f"the file was compressed on {header.settings['device']}; decompress it "
                         f"there, not on {device} (the probabilities differ in their last bits)")


def check_pixels(images: Tensor, header: Header) -> None:
    """Each decoded image must match the checksum of the image that was compressed."""
    for k, image in enumerate(images):
        if image_crc(image.numpy().tobytes()) != header.image_crcs[k]:
            raise ValueError(f"image {k}: {NOT_EXACT}")


def model_fingerprint(model: AxialTransformer) -> bytes:
    """SHA-256 of the model's config (JSON, sorted keys) and of its weights' bytes, tensor by
    tensor in the order of their names, each after its name, dtype and shape."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


@contextlib.contextmanager
def coding_mode(model: AxialTransformer, threads: int) -> Iterator[None]:
    """Eval mode, no autograd, no autocast, full-precision fp32 matmuls and `threads` CPU
    threads: the same arithmetic when compressing and when decompressing. Restores all of it."""
    was_training, saved_threads = model.training, torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    model.eval()
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")
    try:
        device = next(model.parameters()).device.type
        # Plain attribute lookups speed up the eager loop without touching its arithmetic; the
        # other eager-decoding settings are left out, so that files decode as they always have.
        with torch.inference_mode(), torch.autocast(device, enabled=False), \
                cpu_speedups.plain_attributes(model):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(saved_threads)
        model.train(was_training)


def rows_bar(model: AxialTransformer, images: int, batch_size: int, desc: str,
             progress: bool) -> tqdm:
    """One progress bar over every row that `decode` runs, all batches together."""
    batches = -(-images // batch_size)
    total = batches * model.config.channels * model.config.image_size[0]
    return tqdm(total=total, unit="row", desc=desc, disable=not progress)
