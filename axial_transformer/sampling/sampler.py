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

from ..model.decoding import decode, decoding_mode
from ..model.transformer import AxialTransformer, at_least_fp32
from .request import Request

__all__ = ["Request", "draw", "sample", "sample_naive"]


def sample(model: AxialTransformer, num_samples: int, **request) -> Tensor:
    """Draw `num_samples` images row by row with key/value caches -> uint8 [B, C, H, W] on the
    model's device, the model running in its own dtype (or bf16 autocast). The keyword arguments
    are the fields of `Request` (temperature, generator, known and known_mask, noise, labels,
    guidance, batch_size, autocast, on_logits, progress, compile), which says what each means."""
    return draw(model, Request(num_samples, **request))


def sample_naive(model: AxialTransformer, num_samples: int, **request) -> Tensor:
    """Draw images by running the whole slice through the model for every subpixel: slow
    (C*H*W forward passes) but plainly the model's distribution, the reference that `sample`
    must reproduce exactly. Arguments as in `sample` (`progress` and `compile` do nothing)."""
    return draw(model, Request(num_samples, **request), naive=True)


def draw(model: AxialTransformer, request: Request, naive: bool = False) -> Tensor:
    """The images of a request, batch after batch, by the cached sampler (or the naive one);
    a video model's clips by the video samplers (video.py)."""
    if model.config.frames:
        from .video import draw_video_cached, draw_video_naive

        draw_batch = draw_video_naive if naive else draw_video_cached
    else:
        draw_batch = draw_naive if naive else draw_cached
    return torch.cat([draw_batch(model, batch) for batch in request.batches()])


def draw_cached(model: AxialTransformer, r: Request) -> Tensor:
    x, mask, rows, labels, autocast = r.start(model)
    choose = GumbelMax(rows, r.temperature, kept(mask, x, r.compile), x.device, r.guidance)
    on_logits = r.on_logits
    if r.guidance != 1:
        x = x.repeat(2, 1, 1, 1)  # the second half is told "no class"
        if on_logits is not None:
            on_logits = lambda c, i, j, logits: r.on_logits(c, i, j, guide(logits, r.guidance))
    # Rows whose every pixel is known need no inner decoding: their pixels are already in x,
    # which is all the outer decoder and the later channels read.
    skip = None if mask is None or on_logits is not None else mask.all(0).all(-1).tolist()
    with decoding_mode(model, x, autocast, r.compile):
        decode(model, x, choose, labels, skip, on_logits, r.progress, r.compile)
    return pixels(x[: r.num_samples], model.config.levels)


def draw_naive(model: AxialTransformer, r: Request) -> Tensor:
    x, mask, rows, labels, autocast = r.start(model)
    c, (h, w), guided = model.config.channels, model.config.image_size, r.guidance != 1
    with decoding_mode(model, x, autocast):
        for ci in range(c):
            for i in range(h):
                gumbel = next(rows)
                for j in range(w):
                    canvas = x.repeat(2, 1, 1, 1) if guided else x
                    channel = torch.full((len(canvas),), ci, device=x.device)
                    logits = at_least_fp32(model.slice_logits(canvas, channel, labels)[:, i, j])
                    if guided:
                        logits = guide(logits, r.guidance)
                    if r.on_logits is not None:
                        r.on_logits(ci, i, j, logits)
                    drawn = (logits.to(gumbel.dtype) / r.temperature + gumbel[:, j]).argmax(-1)
                    if mask is not None:
                        drawn = torch.where(mask[:, ci, i, j], x[:, ci, i, j], drawn)
                    x[:, ci, i, j] = drawn
    return pixels(x, model.config.levels)


def kept(mask: Tensor | None, x: Tensor, compile: bool) -> Tensor | None:
    """The known-pixel mask `GumbelMax` takes for the canvas x. Eager, no mask is no work.
    Compiled steps always take a contiguous mask, whatever the caller's layout, so that every
    call (a warm-up with known pixels too, every frame of a clip) uses one graph."""
    if not compile:
        return mask
    return torch.zeros_like(x, dtype=torch.bool) if mask is None else mask.contiguous()


def pixels(x: Tensor, levels: int) -> Tensor:
    """The drawn values as images: uint8 where they fit."""
    return x.to(torch.uint8) if levels <= 256 else x


class GumbelMax:
    """The sampler's `Choice`: argmax(logits / T + g) with the Gumbel noise g of the current row,
    except where `keep` [B, C, H, W] (if given) says a pixel is known. With guidance s != 1 the
    batch is doubled, its second half told "no class": the logits are guided and the value
    goes to both halves."""

    def __init__(self, rows: Iterator[Tensor], temperature: float, keep: Tensor | None,
                 device: torch.device, guidance: float = 1.0) -> None:
        self.rows, self.keep_all, self.keep, self.guidance = rows, keep, None, guidance
        self.temperature = torch.tensor(float(temperature), device=device)

    def start_row(self, ci: int, i: int) -> None:
        self.gumbel = next(self.rows)  # [B, W, V]
        if self.keep_all is not None:
            self.keep = self.keep_all[:, ci, i]  # [B, W]

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        if self.guidance != 1:
            logits, x_row = guide(logits, self.guidance), x_row.chunk(2)[0]
        scores = logits.to(self.gumbel.dtype) / self.temperature
        drawn = (scores + self.gumbel.index_select(1, column)[:, 0]).argmax(-1)
        if self.keep is not None:
            drawn = torch.where(self.keep.index_select(1, column)[:, 0],
                                x_row.index_select(1, column)[:, 0], drawn)
        return drawn if self.guidance == 1 else drawn.repeat(2)


def guide(logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, uncond + s (cond - uncond), of logits [2B, V] whose first half
    is conditional."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)

