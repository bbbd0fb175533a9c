"""Drawing images from the Axial Transformer: the cached sampler and the naive reference.

Both follow the model's order (channel c, row i, column j) and draw each subpixel by the
Gumbel-max trick, `argmax(logits / T + g)` with g ~ Gumbel(0, 1), an exact draw from
softmax(logits / T). The noise is supplied or drawn from `generator` one row [B, W, V] at a time
in (c, i) order, the same in both samplers, so from the same noise or seed they return IDENTICAL
images. `sample_naive` is the definition (one teacher-forced forward pass per subpixel); `sample`
runs the model's cached decoding steps through `decoding.decode`.

A class-conditional model samples the classes `labels`; with `guidance` s != 1 it samples with
classifier-free guidance (Ho and Salimans 2022), logits = uncond + s (cond - uncond), the
unconditional logits coming from the same model told "no class" (a model trained with label
dropout). Both halves run as one batch of twice the size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..model.decoding import Choice, LogitsHook, decode, decoding_mode
from ..model.transformer import AxialTransformer, at_least_fp32
from .request import output, start

__all__ = ["sample", "sample_naive"]


def sample(
    model: AxialTransformer,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
    autocast: bool | None = None,
    on_logits: LogitsHook | None = None,
    compile: bool = False,
    labels: int | Tensor | None = None,
    guidance: float = 1.0,
) -> Tensor:
    """Draw `num_samples` images row by row with key/value caches -> uint8 [B, C, H, W].

    temperature: divides the logits (T < 1 sharpens, T > 1 flattens); must be > 0.
    generator:   a torch.Generator for the Gumbel noise (rows drawn in (channel, row) order).
    known, known_mask: [B or 1, C, H, W] integer pixels and a bool mask. Masked pixels are kept as
        given; the rest are drawn in the model's order, each exactly from softmax(logits / T)
        given everything before it. Known pixels LATER in the order are kept but not conditioned
        on, so completion is exact only when the known pixels form a prefix of the order (the top
        K rows of a one-channel image) and approximate otherwise: for the top K rows of an RGB
        image, the red rows below K are drawn without seeing the known green and blue rows.
    noise:       Gumbel noise [B, C, H, W, V] to use instead of `generator` (for exact tests).
    progress:    a tqdm bar advancing per row.
    autocast:    bf16 autocast; by default where the device runs bf16 fast (precision.py).
    on_logits:   called as on_logits(c, i, j, logits [B, V]) for every subpixel (for tests and
        for scoring samples as they are drawn); keeps fully known rows from being skipped.
    compile:     run each outer-decoder row and each subpixel as one torch.compile'd graph with
        the weights frozen in: faster at batch 1 on the CPU, after a compilation per model and
        batch size (docs/benchmarks.md); the graphs are kept while the weights stay unchanged.
        Same draws; the logits may differ from the eager ones in the last bits.
    labels:      a class-conditional model's classes: an int for every image or [B] (-1: none).
    guidance:    classifier-free guidance scale s; 1 samples the conditional model as it is.

    The samples are on the model's device; the model runs in its own dtype (or bf16 autocast).
    """
    r = start(model, num_samples, temperature, generator, known, known_mask, noise, autocast,
               labels, guidance)
    # Eager, no mask is no work. Compiled steps always take a contiguous mask, whatever the
    # caller's layout, so that every call (a warm-up with known pixels too) uses one graph.
    keep = r.mask
    if compile:
        keep = torch.zeros_like(r.x, dtype=torch.bool) if keep is None else keep.contiguous()
    choose: Choice = GumbelMax(r.rows, temperature, keep, r.x.device)
    x, labels = r.x, r.labels
    if guidance != 1:
        x, labels, choose = doubled(x), with_no_class(labels), Guided(choose, guidance)
        if on_logits is not None:
            hook = on_logits
            on_logits = lambda c, i, j, logits: hook(c, i, j, guide(logits, guidance))  # noqa: E731
    # Rows whose every pixel is known need no inner decoding: their pixels are already in x,
    # which is all the outer decoder and the later channels read.
    skip = None if r.mask is None or on_logits is not None else r.mask.all(0).all(-1).tolist()
    with decoding_mode(model, x, r.autocast, compile):
        decode(model, x, choose, labels, skip, on_logits, progress, compile)
    return output(x[:num_samples], model.config.levels)


def sample_naive(
    model: AxialTransformer,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    noise: Tensor | None = None,
    autocast: bool | None = None,
    on_logits: LogitsHook | None = None,
    labels: int | Tensor | None = None,
    guidance: float = 1.0,
) -> Tensor:
    """Draw images by running the whole slice through the model for every subpixel.

    Slow (C*H*W forward passes) but plainly the model's distribution: the reference that
    `sample` must reproduce exactly. Arguments as in `sample`.
    """
    r = start(model, num_samples, temperature, generator, known, known_mask, noise, autocast,
               labels, guidance)
    x, c, (h, w) = r.x, model.config.channels, model.config.image_size
    labels = r.labels if guidance == 1 else with_no_class(r.labels)
    with decoding_mode(model, x, r.autocast):
        for ci in range(c):
            channel = torch.full((len(x) if guidance == 1 else 2 * len(x),), ci, device=x.device)
            for i in range(h):
                gumbel = next(r.rows)
                for j in range(w):
                    canvas = x if guidance == 1 else doubled(x)
                    logits = at_least_fp32(model.slice_logits(canvas, channel, labels)[:, i, j])
                    if guidance != 1:
                        logits = guide(logits, guidance)
                    if on_logits is not None:
                        on_logits(ci, i, j, logits)
                    drawn = (logits.to(gumbel.dtype) / temperature + gumbel[:, j]).argmax(-1)
                    if r.mask is not None:
                        drawn = torch.where(r.mask[:, ci, i, j], x[:, ci, i, j], drawn)
                    x[:, ci, i, j] = drawn
    return output(x, model.config.levels)


class GumbelMax:
    """The sampler's choice: argmax(logits / T + g) with the Gumbel noise g of the current row,
    except where `keep` [B, C, H, W] (if given) says a pixel is known."""

    def __init__(self, rows: Iterator[Tensor], temperature: float, keep: Tensor | None,
                 device: torch.device) -> None:
        self.rows, self.keep_all, self.keep = rows, keep, None
        self.temperature = torch.tensor(float(temperature), device=device)

    def start_row(self, ci: int, i: int) -> None:
        self.gumbel = next(self.rows)  # [B, W, V]
        if self.keep_all is not None:
            self.keep = self.keep_all[:, ci, i]  # [B, W]

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        scores = logits.to(self.gumbel.dtype) / self.temperature
        drawn = (scores + self.gumbel.index_select(1, column)[:, 0]).argmax(-1)
        if self.keep is None:
            return drawn
        return torch.where(self.keep.index_select(1, column)[:, 0],
                           x_row.index_select(1, column)[:, 0], drawn)


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance: the batch doubled, its second half told "no class".


def guide(logits: Tensor, scale: float) -> Tensor:
    """uncond + s (cond - uncond) of logits [2B, V] whose first half is conditional."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def doubled(x: Tensor) -> Tensor:
    return torch.cat([x, x])


def with_no_class(labels: Tensor) -> Tensor:
    return torch.cat([labels, torch.full_like(labels, -1)])


class Guided:
    """A choice made from guided logits; its value goes to both halves of the doubled batch."""

    def __init__(self, choose: Choice, scale: float) -> None:
        self.choose, self.scale = choose, scale

    def start_row(self, ci: int, i: int) -> None:
        self.choose.start_row(ci, i)

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        value = self.choose(guide(logits, self.scale), column, x_row.chunk(2)[0])
        return value.repeat(2)
