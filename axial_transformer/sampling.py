"""Drawing images from the Axial Transformer: the cached sampler and the naive reference.

Both follow the model's order (channel c, row i, column j) and draw each subpixel by the
Gumbel-max trick, `argmax(logits / T + g)` with g ~ Gumbel(0, 1), an exact draw from
softmax(logits / T). The noise is supplied or drawn from `generator` one row [B, W, V] at a time
in (c, i) order, the same in both samplers, so from the same noise or seed they return IDENTICAL
images. `sample_naive` is the definition (one teacher-forced forward pass per subpixel); `sample`
runs `decode`, the loop of the model's cached decoding steps (`AxialTransformer.outer_step`,
`inner_step`), whose arithmetic is that of one teacher-forced forward pass over the image:

  per channel c:   ctx = channel_encoder(x[<c])                           once
  per row i:       u[i] = outer_step(row i-1), masked column layers cached over rows
  per column j:    x[c, i, j] = choose(inner_step(h[i, j-1] + u[i] + pos[i] + ctx[i]))

`decode` is also the codec's loop: it chooses each value from a range decoder instead.
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

from . import runtime
from .attention import Position, decoding_positions
from .model import AxialTransformer, at_least_fp32

__all__ = ["Choice", "LogitsHook", "decode", "sample", "sample_naive"]

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
    skip: list[list[bool]] | None = None,
    on_logits: LogitsHook | None = None,
    progress: bool = False,
    compile: bool = False,
) -> Tensor:
    """Fill x [B, C, H, W] (long, on the model's device) in the model's order, in place: each
    subpixel's value is `choose(logits, column, x_row)` given everything before it. Rows with
    skip[c][i] True are left as they are and not decoded (their pixels must already be in x).
    With `compile`, each outer-decoder row and each subpixel run as one compiled graph."""
    b, c, h, w = x.shape
    dim = model.config.dim
    like = model.pos_h
    if torch.is_autocast_enabled(x.device.type):
        like = like.to(torch.get_autocast_dtype(x.device.type))
    outer_caches, inner_caches = model.new_caches(b, like)
    rows, columns = decoding_positions(h, like), decoding_positions(w, like)
    outer_step, pixel_step = compiled_steps(model) if compile else (model.outer_step, _pixel)
    pos = model.positions()  # (H, W, D)
    bar = tqdm(total=c * h, unit="row", desc="decoding", disable=not progress)
    # Whether each compiled graph has passed its guards once in this call (see skip_guard_checks).
    outer_checked = pixel_checked = False
    for ci in range(c):
        ctx = None
        u = pos.new_zeros((b, w, dim))  # shift_down's zero row: row 0 sees no rows above
        for i in range(h):
            choose.start_row(ci, i)
            bar.update()
            if skip is not None and all(skip[ci][i:]):  # nothing left to decode in this channel
                continue
            if ctx is None:
                ctx = model.channel_context(x, torch.full((b,), ci, device=x.device))
            if i > 0:
                above = model.pixel_embedding(x[:, ci, i - 1]) + pos[i - 1] + ctx[:, i - 1]
                with runtime.skip_guard_checks(compile and outer_checked):
                    u = outer_step(above, outer_caches, rows[i - 1])
                outer_checked = True
            if skip is None or not skip[ci][i]:
                row_inputs = u + pos[i] + ctx[:, i]  # (B, W, D): all but shift_right(h)
                h_left = pos.new_zeros((b, dim))  # shift_right's zero column
                for j in range(w):
                    with runtime.skip_guard_checks(compile and pixel_checked):
                        h_left, logits = pixel_step(model, choose, h_left, row_inputs,
                                                    inner_caches, columns[j], x[:, ci, i])
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
) -> tuple[Tensor, Tensor]:
    """One subpixel: its logits, its value written into x_row [B, W], and the value's embedding
    for the pixel on its right -> (embedding [B, D], logits [B, V]). Whole rows go in and the
    column is a tensor, so that one compiled graph serves every column."""
    j = column.index
    logits = model.inner_step(h_left + row_inputs.index_select(1, j)[:, 0], caches, column)
    value = choose(logits, j, x_row)
    x_row.index_copy_(1, j, value[:, None])
    return F.embedding(value, model.pixel_embedding.weight), logits


# The model and weights the graphs were last compiled for, and the compiled steps.
_compiled: tuple[weakref.ref, tuple, tuple[Callable, Callable]] | None = None


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or written in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def compiled_steps(model: AxialTransformer) -> tuple[Callable, Callable]:
    """`model.outer_step` and `_pixel`, compiled with the weights frozen in as constants.

    Dynamo's guards do not look at tensor values: a graph compiled before the weights changed (an
    optimizer step, a loaded checkpoint) would go on sampling from the old ones. So the graphs
    are kept for one model whose parameters are the same tensors at the same versions (every
    in-place write bumps a tensor's version), and otherwise compiled afresh.
    """
    global _compiled
    weights = weights_key(model)
    if _compiled is not None and _compiled[0]() is model and _compiled[1] == weights:
        return _compiled[2]
    for function in (AxialTransformer.outer_step, _pixel):
        runtime.forget_compiled(function)
    steps = (torch.compile(model.outer_step, fullgraph=True, dynamic=False),
             torch.compile(_pixel, fullgraph=True, dynamic=False))
    _compiled = (weakref.ref(model), weights, steps)
    return steps


# ------------------------------------------------------------------------------------------------
# Sampling: checks, noise, the Gumbel-max choice.


def _check_request(
    model: AxialTransformer,
    num_samples: int,
    temperature: float,
    generator: torch.Generator | None,
    known: Tensor | None,
    known_mask: Tensor | None,
    noise: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate the arguments; return (known, known_mask) expanded to the batch, or Nones."""
    c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either noise or a generator, not both")
        shape = (num_samples, c, h, w, levels)
        if not isinstance(noise, Tensor) or not noise.dtype.is_floating_point:
            raise ValueError(f"noise must be a floating-point tensor of shape {list(shape)}")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {list(shape)} (Gumbel noise per subpixel and "
                             f"value), got {list(noise.shape)}")
    if known is None and known_mask is None:
        return None, None
    if known is None or known_mask is None:
        raise ValueError("known and known_mask go together: pass both or neither")
    for name, t in (("known", known), ("known_mask", known_mask)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or tuple(t.shape[1:]) != (c, h, w) or t.shape[0] not in (1, num_samples):
            raise ValueError(f"{name} must have shape [{num_samples} or 1, {c}, {h}, {w}], "
                             f"got {list(t.shape)}")
    if known.dtype.is_floating_point or known.dtype.is_complex or known.dtype == torch.bool:
        raise ValueError(f"known must hold integer pixel values 0..{levels - 1} (e.g. uint8), "
                         f"got a {known.dtype} tensor")
    if known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor (True = keep), got {known_mask.dtype}")
    shape = (num_samples, c, h, w)
    known, known_mask = known.expand(shape), known_mask.expand(shape)
    given = known[known_mask.to(known.device)]
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= levels):
        raise ValueError(f"known pixel values must lie in 0..{levels - 1}, "
                         f"got {int(given.min())}..{int(given.max())}")
    return known, known_mask


def _gumbel_rows(
    model: AxialTransformer,
    num_samples: int,
    noise: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[Tensor]:
    """The Gumbel noise of each row, [B, W, V], in (channel, row) order."""
    c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
    gen_device = generator.device if generator is not None else device
    tiny = torch.finfo(dtype).tiny
    for ci in range(c):
        for i in range(h):
            if noise is not None:
                yield noise[:, ci, i].to(device=device, dtype=dtype)
            else:
                u = torch.rand((num_samples, w, levels), generator=generator, device=gen_device,
                               dtype=dtype)
                yield u.clamp_(min=tiny).log_().neg_().log_().neg_().to(device)


def _draw(logits: Tensor, gumbel: Tensor, temperature: float) -> Tensor:
    """Gumbel-max: an exact draw from softmax(logits / T). [B, V], [B, V] -> [B]."""
    return (logits.to(gumbel.dtype) / temperature + gumbel).argmax(-1)


@contextlib.contextmanager
def _sampling_mode(model: nn.Module, x: Tensor, autocast: bool, compiled: bool = False):
    """Eval mode (no dropout), no autograd, bf16 autocast if asked, one CPU thread for small
    eager batches; restores the training flag."""
    was_training = model.training
    model.eval()
    frozen = runtime.frozen_weights_compilation(x.device) if compiled else contextlib.nullcontext()
    try:
        with torch.inference_mode(), frozen, \
                runtime.decoding_threads(x.shape[0], x.device, compiled), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            yield
    finally:
        model.train(was_training)


def _start(
    model: AxialTransformer,
    num_samples: int,
    temperature: float,
    generator: torch.Generator | None,
    known: Tensor | None,
    known_mask: Tensor | None,
    noise: Tensor | None,
    autocast: bool | None,
) -> tuple[Tensor, Tensor | None, Iterator[Tensor], bool]:
    """Checks, then the canvas x [B, C, H, W] (long, known pixels filled in), the mask on the
    model's device, the row noise and whether to autocast."""
    known, known_mask = _check_request(model, num_samples, temperature, generator, known,
                                       known_mask, noise)
    param = next(model.parameters())
    c, (h, w) = model.config.channels, model.config.image_size
    x = torch.zeros((num_samples, c, h, w), dtype=torch.long, device=param.device)
    if known is not None:
        known_mask = known_mask.to(param.device)
        x = torch.where(known_mask, known.to(param.device, torch.long), x)
    if autocast is None:
        autocast = param.device.type == "cuda"
    rows = _gumbel_rows(model, num_samples, noise, generator, param.device,
                        torch.promote_types(param.dtype, torch.float32))
    return x, known_mask, rows, autocast


def _output(x: Tensor, levels: int) -> Tensor:
    return x.to(torch.uint8) if levels <= 256 else x


# ------------------------------------------------------------------------------------------------
# The reference: one full teacher-forced forward pass per subpixel.


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
) -> Tensor:
    """Draw images by running the whole slice through the model for every subpixel.

    Slow (C*H*W forward passes) but plainly the model's distribution: the reference that
    `sample` must reproduce exactly. Arguments as in `sample`.
    """
    x, mask, rows, autocast = _start(model, num_samples, temperature, generator, known,
                                     known_mask, noise, autocast)
    c, (h, w) = model.config.channels, model.config.image_size
    with _sampling_mode(model, x, autocast):
        for ci in range(c):
            channel = torch.full((num_samples,), ci, device=x.device)
            for i in range(h):
                gumbel = next(rows)
                for j in range(w):
                    logits = model.slice_logits(x, channel)[:, i, j]
                    logits = at_least_fp32(logits)
                    if on_logits is not None:
                        on_logits(ci, i, j, logits)
                    drawn = _draw(logits, gumbel[:, j], temperature)
                    if mask is not None:
                        drawn = torch.where(mask[:, ci, i, j], x[:, ci, i, j], drawn)
                    x[:, ci, i, j] = drawn
    return _output(x, model.config.levels)




class GumbelMax:
    """The sampler's choice: argmax(logits / T + g) with the Gumbel noise g of the current row,
    except where `keep` [B, C, H, W] says a pixel is known."""

    def __init__(self, rows: Iterator[Tensor], temperature: float, keep: Tensor) -> None:
        self.rows, self.keep_all = rows, keep
        self.temperature = torch.tensor(float(temperature), device=keep.device)

    def start_row(self, ci: int, i: int) -> None:
        self.gumbel, self.keep = next(self.rows), self.keep_all[:, ci, i]  # [B, W, V], [B, W]

    def __call__(self, logits: Tensor, column: Tensor, x_row: Tensor) -> Tensor:
        j = column
        scores = logits.to(self.gumbel.dtype) / self.temperature
        drawn = (scores + self.gumbel.index_select(1, j)[:, 0]).argmax(-1)
        return torch.where(self.keep.index_select(1, j)[:, 0], x_row.index_select(1, j)[:, 0],
                           drawn)


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
    autocast:    bf16 autocast; default on when the model is on CUDA.
    on_logits:   called as on_logits(c, i, j, logits [B, V]) for every subpixel (for tests and
        for scoring samples as they are drawn); keeps fully known rows from being skipped.
    compile:     run each outer-decoder row and each subpixel as one torch.compile'd graph with
        the weights frozen in: faster at batch 1 on the CPU, after a compilation per model and
        batch size (docs/benchmarks.md); the graphs are kept while the weights stay unchanged.
        Same draws; the logits may differ from the eager ones in the last bits.

    The samples are on the model's device; the model runs in its own dtype (or bf16 autocast).
    """
    x, mask, rows, autocast = _start(model, num_samples, temperature, generator, known,
                                     known_mask, noise, autocast)
    keep = mask if mask is not None else torch.zeros_like(x, dtype=torch.bool)
    # Rows whose every pixel is known need no inner decoding: their pixels are already in x,
    # which is all the outer decoder and the later channels read.
    skip = None if mask is None or on_logits is not None else mask.all(0).all(-1).tolist()
    with _sampling_mode(model, x, autocast, compile):
        decode(model, x, GumbelMax(rows, temperature, keep), skip, on_logits, progress, compile)
    return _output(x, model.config.levels)
