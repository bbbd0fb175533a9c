"""The model's order, one subpixel at a time: the sampler's decoding loop.

`decode` runs the model's cached decoding steps (`AxialTransformer.outer_step`, `inner_step`)
over an image canvas in the order of the factorisation, and asks a `Choice` for the value of
each subpixel given its logits: a Gumbel-max draw when sampling, or a range coder over the float
logits (bench/codec_bench.py; the codec itself runs the same steps in exact arithmetic,
codec/exact_model.py). Its arithmetic is that of one teacher-forced forward pass over the image:

  per channel c:   ctx = channel_encoder(x[<c])                           once
  per row i:       u[i] = outer_step(row i-1), masked column layers cached over rows
  per column j:    x[c, i, j] = choose(inner_step(h[i, j-1] + u[i] + pos[i] + ctx[i]))

Axis letters: b batch, c channels, h rows, w columns, d features, v pixel values.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import cpu_speedups
from .attention import Position, decoding_positions
from .transformer import AxialTransformer, at_least_fp32

# Called with (channel, row, column, logits [B, V]) for every subpixel, in the order of the draws.
LogitsHook = Callable[[int, int, int, Tensor], None]


class Choice(Protocol):
    """How `decode` picks each subpixel's value: a Gumbel-max draw, a range decoder, ..."""

    def start_row(self, channel: int, row: int) -> None:
        """Called before each row, in the model's order, skipped rows included."""

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        """The values [B] of column `column` ([1] long) from their logits [B, V]; x_row [B, W]
        is the row so far, known pixels filled in."""


def decode(
    model: AxialTransformer,
    x: Tensor,
    choose: Choice,
    labels: Tensor | None = None,
    skip: list[list[bool]] | None = None,
    on_logits: LogitsHook | None = None,
    progress: bool = False,
    compile: bool = False,
    frame_context: Tensor | None = None,
    frame_prior: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Fill x [B, C, H, W] (long, on the model's device) in the model's order, in place: each
    subpixel's value is `choose(logits, column, x_row)` given everything before it (and the
    images' classes `labels` [B] in a class-conditional model). Rows with skip[c][i] True are
    left as they are (their pixels must already be in x). With `compile`, each outer-decoder row
    and each subpixel run as one compiled graph. A video model decodes each frame with its
    `frame_context` [B, H, W, D] (`AxialTransformer.channel_context`), and its prior on the
    logits, `frame_prior` = (rows [B, C, H, W], table [R, V]): each subpixel's logits gain
    table[rows[b, c, i, j]] (`VideoTransformer.prior`). Run it inside `decoding_mode`."""
    b, c, h, w = x.shape
    like = model.pos_h
    if torch.is_autocast_enabled(x.device.type):
        like = like.to(torch.get_autocast_dtype(x.device.type))
    outer_caches, inner_caches = model.new_caches(b, like)
    rows, columns = decoding_positions(h, like), decoding_positions(w, like)
    outer_step, pixel_step = compiled_steps(model) if compile else (model.outer_step, _pixel)
    pos = model.positions()  # (H, W, D)
    bar = tqdm(total=c * h, unit="row", desc="decoding", disable=not progress)
    # Whether each compiled graph has passed its guards once in this call (skip_guard_checks).
    outer_checked = pixel_checked = False
    for ci in range(c):
        ctx = None
        u = pos.new_zeros((b, w, model.config.dim))  # shift_down's zero row for row 0
        for i in range(h):
            choose.start_row(ci, i)
            bar.update()
            if skip is not None and all(skip[ci][i:]):  # nothing left to decode in this channel
                continue
            if ctx is None:
                ctx = model.channel_context(x, torch.full((b,), ci, device=x.device), labels,
                                            frame_context)
            if i > 0:
                above = model.pixel_embedding(x[:, ci, i - 1]) + pos[i - 1] + ctx[:, i - 1]
                with cpu_speedups.skip_guard_checks(compile and outer_checked):
                    u = outer_step(above, outer_caches, rows[i - 1])
                outer_checked = True
            if skip is not None and skip[ci][i]:
                continue
            row_inputs = u + pos[i] + ctx[:, i]  # (B, W, D): all but shift_right(h)
            prior = None if frame_prior is None else (frame_prior[0][:, ci, i], frame_prior[1])
            h_left = pos.new_zeros((b, model.config.dim))  # shift_right's zero column
            x_row = x[:, ci, i]
            # The stance is global: user code (on_logits) must not run inside it.
            with cpu_speedups.skip_guard_checks(compile and pixel_checked and on_logits is None):
                for j in range(w):
                    h_left, logits = pixel_step(model, choose, h_left, row_inputs, inner_caches,
                                                columns[j], x_row, prior)
                    if on_logits is not None:
                        on_logits(ci, i, j, at_least_fp32(logits))
            pixel_checked = True
    bar.close()
    return x


def _pixel(
    model: AxialTransformer,
    choose: Choice,
    h_left: Tensor,
    row_inputs: Tensor,
    caches: list,
    column: Position,
    x_row: Tensor,
    prior: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One subpixel: its logits, its value written into x_row [B, W], and the value's embedding
    for the pixel on its right -> (embedding [B, D], logits [B, V]). Whole rows go in and the
    column is a tensor, so that one compiled graph serves every column."""
    j = column.index
    logits = model.inner_step(h_left + row_inputs.index_select(1, j)[:, 0], caches, column)
    if prior is not None:  # a video frame's: the table row of each pixel of the row [B, W]
        rows, table = prior
        logits = logits + F.embedding(rows.index_select(1, j)[:, 0], table)
    value = choose(logits, j, x_row)
    x_row.index_copy_(1, j, value[:, None])
    return F.embedding(value, model.pixel_embedding.weight), logits


@contextlib.contextmanager
def decoding_mode(model: nn.Module, x: Tensor, autocast: bool,
                  compiled: bool = False) -> Iterator[None]:
    """Eval mode (no dropout), no autograd, bf16 autocast if asked, and the runtime settings of
    a compiled or an eager decoding loop; restores the training flag."""
    was_training = model.training
    model.eval()
    settings = (cpu_speedups.frozen_weights_compilation(x.device) if compiled
                else cpu_speedups.eager_decoding(model, x.shape[0], x.device))
    try:
        with settings, torch.inference_mode(), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            yield
    finally:
        model.train(was_training)


# The model and weights the graphs were last compiled for, and the compiled steps.
_compiled: tuple[weakref.ref, tuple, tuple[Callable, Callable]] | None = None


def compiled_steps(model: AxialTransformer) -> tuple[Callable, Callable]:
    """`model.outer_step` and `_pixel`, compiled with the weights frozen in as constants.

    Dynamo's guards do not look at tensor values: a graph compiled before the weights changed (an
    optimizer step, a loaded checkpoint) would go on sampling from the old ones. So the graphs
    are kept for one model whose parameters are the same tensors at the same versions
    (`cpu_speedups.weights_version`), and otherwise compiled afresh.
    """
    global _compiled
    weights = cpu_speedups.weights_version(model)
    if _compiled is not None and _compiled[0]() is model and _compiled[1] == weights:
        return _compiled[2]
    for function in (AxialTransformer.outer_step, _pixel):
        cpu_speedups.forget_compiled(function)
    steps = (torch.compile(model.outer_step, fullgraph=True, dynamic=False),
             torch.compile(_pixel, fullgraph=True, dynamic=False))
    _compiled = (weakref.ref(model), weights, steps)
    return steps
