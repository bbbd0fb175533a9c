"""Drawing images from the Axial Transformer: a naive reference sampler and the fast cached one.

Both follow the model's channel-major order (channel c, row i, column j) and draw each subpixel
by the Gumbel-max trick, `argmax(logits / T + g)` with g ~ Gumbel(0, 1): that is an exact draw
from softmax(logits / T). The noise g is either supplied or drawn from `generator` one row
[B, W, V] at a time in (c, i) order, the same in both samplers, so from the same noise or seed
they return IDENTICAL images. `sample_naive` is the definition (one teacher-forced forward pass
per subpixel); `sample` is the fast one (DESIGN.md section 3):

  per channel c:   ctx = channel_encoder(x[<c])                           once
  per row i:       u[i] = outer_decoder(row i-1), masked column layers cached over rows
  per column j:    r = h[i, j-1] + u[i] + pos[i] + ctx[i], masked row layers cached over columns
                   x[c, i, j] = argmax(logits(inner_decoder(r)) / T + g)

so its arithmetic matches one teacher-forced forward pass over the image.

Axis letters: b batch, c channels, h rows, w columns, d features, v pixel values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attention import KVCache
from .model import AxialBlock, AxialTransformer, at_least_fp32, sigmoid_gelu

__all__ = ["LogitsHook", "sample", "sample_naive"]

# Called with (channel, row, column, logits [B, V]) for every subpixel, in the order of the draws.
LogitsHook = Callable[[int, int, int, Tensor], None]


# ------------------------------------------------------------------------------------------------
# Input checks and the pieces both samplers share.


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


# Below this batch a CPU sampling step is a chain of matrix-vector products too small to split
# between threads: with two threads a 32x32 image at batch 1 took 1.4x as long as with one.
SINGLE_THREAD_BELOW_BATCH = 8


@contextlib.contextmanager
def _sampling_mode(model: nn.Module, x: Tensor, autocast: bool, compiled: bool = False):
    """Eval mode (no dropout), no autograd, bf16 autocast if asked, one CPU thread for small
    eager batches; restores the training flag and the thread count."""
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if x.device.type == "cpu" and x.shape[0] < SINGLE_THREAD_BELOW_BATCH and not compiled:
        torch.set_num_threads(1)
    # Frozen weights let inductor's CPU GEMM templates pack the matrix-vector products of a
    # compiled step: 2-4x faster than mkl's at batch 1 (its autotuning times both and picks).
    # `torch.compile(options=...)` does not pass `freezing` through, hence the patch.
    compile_config = torch._inductor.config.patch(
        freezing=True, max_autotune=x.device.type == "cpu", autotune_num_choices_displayed=0,
        max_autotune_report_choices_stats=False,
    ) if compiled else contextlib.nullcontext()
    try:
        with torch.inference_mode(), compile_config, \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            yield
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)


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


# ------------------------------------------------------------------------------------------------
# The fast sampler.


class _RowBlock(NamedTuple):
    """The tensors of one masked row block, looked up once per call of `sample`: at batch 1 a
    module call or attribute lookup costs as much as the arithmetic of a one-pixel step."""

    attn_norm: tuple[Tensor, Tensor, float]
    to_qkv: tuple[Tensor, Tensor]  # (bias, weight^T)
    to_out: tuple[Tensor, Tensor]
    mlp_norm: tuple[Tensor, Tensor, float]
    mlp_in: tuple[Tensor, Tensor]
    mlp_out: tuple[Tensor, Tensor]
    heads: int
    head_dim: int

    @staticmethod
    def norm(m: nn.LayerNorm) -> tuple[Tensor, Tensor, float]:
        return m.weight, m.bias, m.eps

    @staticmethod
    def dense(m: nn.Linear) -> tuple[Tensor, Tensor]:
        # Stored as (bias, weight^T) for torch.addmm: with the weight already transposed in
        # memory, a one-row product runs about a third faster on the CPU than F.linear's.
        return m.bias, m.weight.t().contiguous()

    @classmethod
    def of(cls, block: AxialBlock) -> _RowBlock:
        norm, dense = cls.norm, cls.dense
        attn = block.attn
        # Attention's 1/sqrt(e) folded into the query projection: one op less per block and pixel.
        weight, bias = attn.scaled_qkv()
        to_qkv = bias, weight.t().contiguous()
        return cls(norm(block.attn_norm), to_qkv, dense(attn.to_out),
                   norm(block.mlp_norm), dense(block.mlp[0]), dense(block.mlp[2]),
                   attn.heads, attn.head_dim)


def _dense(x: Tensor, bias_and_weight_t: tuple[Tensor, Tensor]) -> Tensor:
    bias, weight_t = bias_and_weight_t
    return torch.addmm(bias, x, weight_t)


def _inner_step(blocks: list[_RowBlock], caches: list[KVCache], r: Tensor) -> Tensor:
    """Advance the inner decoder by one column: r [B, D] of column t -> [B, D].

    The arithmetic of `AxialBlock.forward` on one position with a cache (eval mode, so no
    dropout), written functionally on [B, D] rows: at batch 1 the sampler is bound by the
    per-step overhead of Python and small ops, and module calls and the folding of the general
    path cost more than the matmuls. The cache holds only columns <= t, so attending to all of it
    is causal.
    """
    b, d = r.shape
    for blk, cache in zip(blocks, caches, strict=True):
        y = torch.layer_norm(r, (d,), *blk.attn_norm)
        qkv = _dense(y, blk.to_qkv).view(b, 3, blk.heads, 1, blk.head_dim)
        q = qkv[:, 0]  # (B, n, 1, e)
        k, v = cache.append_pair(qkv[:, 1:])  # (B, n, t+1, e) each
        # One query: the plain softmax(q k^T) v (q already scaled) is several times cheaper than
        # SDPA's CPU kernel at this size, and the cache holds only columns <= t: no mask needed.
        weights = (q @ k.transpose(-1, -2)).softmax(-1)
        r = r + _dense((weights @ v).view(b, d), blk.to_out)
        y = _dense(torch.layer_norm(r, (d,), *blk.mlp_norm), blk.mlp_in)
        r = r + _dense(sigmoid_gelu(y), blk.mlp_out)
    return r


class _CompiledSteps:
    """The outer decoder's row step and the inner decoder's subpixel step, each one compiled
    graph (`compiled_steps`); they write into the eager sampler's cache buffers."""

    def __init__(self, model: AxialTransformer, temperature: float, x: Tensor,
                 outer_caches: list[KVCache | None], inner_caches: list[KVCache]) -> None:
        from .compiled_steps import compiled_steps

        b, (h, w), dim = x.shape[0], model.config.image_size, model.config.dim
        # Zeroed: the steps mask the positions not written yet, and 0 * NaN would not vanish.
        self.outer_kv = [c.kv.zero_() if c is not None else None for c in outer_caches]
        self.inner_kv = [c.kv.zero_() for c in inner_caches]
        self.index = [torch.tensor(t, device=x.device) for t in range(max(h, w))]
        self.no_pixel = x.new_zeros((b, dim), dtype=self.inner_kv[0].dtype)
        self.keep_none = torch.zeros((b, w), dtype=torch.bool, device=x.device)
        self.temperature = torch.tensor(float(temperature), device=x.device)
        self.outer_step, self.pixel_step = compiled_steps(model)
        self.outer_checked = self.pixel_checked = False

    @staticmethod
    def _guards(checked: bool):
        """Dynamo checks every input and parameter tensor of a graph on each call, some 60
        tensors: tens of microseconds per subpixel. Every call of one `sample` passes tensors
        made the same way, so once a call has passed the guards (or compiled), the later ones
        skip them. The stance is global, so user code (`on_logits`) never runs inside it."""
        if not checked:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def outer(self, above: Tensor, row: int) -> Tensor:
        """Row `row` [B, W, D] through the outer decoder -> [B, W, D]."""
        with self._guards(self.outer_checked):
            u = self.outer_step(above, self.outer_kv, self.index[row])
        self.outer_checked = True
        return u

    def draw_row(self, row_inputs: Tensor, gumbel: Tensor, row_mask: Tensor | None,
                 x_row: Tensor, on_logits: LogitsHook | None, ci: int, i: int) -> None:
        """Draw row i of channel ci into x_row [B, W], pixel by pixel."""
        keep = self.keep_none if row_mask is None else row_mask
        h_left = self.no_pixel
        with self._guards(self.pixel_checked and on_logits is None):
            for j in range(x_row.shape[1]):
                h_left, logits = self.pixel_step(h_left, row_inputs, self.inner_kv,
                                                 self.index[j], gumbel, self.temperature, keep,
                                                 x_row)
                if on_logits is not None:
                    on_logits(ci, i, j, at_least_fp32(logits))
        self.pixel_checked = True


def _check_inner_decoder(blocks: nn.ModuleList) -> None:
    """`_inner_step` mirrors `AxialBlock`: refuse anything else rather than sample wrongly."""
    for block in blocks:
        if type(block) is not AxialBlock or block.attn.axis != "row" or not block.attn.causal:
            raise ValueError("the fast sampler expects the inner decoder to be masked row "
                             "AxialBlocks; use sample_naive for a modified model")


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
        the weights frozen in (`axial_transformer.compiled_steps`): about 2.5x faster at batch 1
        on the CPU, after 10-30 s of compilation per model and batch size; the graphs are kept
        while the weights stay unchanged. Same draws; the logits may differ from the eager ones
        in the last bits.

    The samples are on the model's device; the model runs in its own dtype (or bf16 autocast).
    """
    x, mask, rows, autocast = _start(model, num_samples, temperature, generator, known,
                                     known_mask, noise, autocast)
    _check_inner_decoder(model.inner_decoder.blocks)
    b, c, h, w = x.shape
    dim = model.config.dim
    # Rows (and channels) whose every pixel is known need no inner decoding: their pixels are
    # already in x, which is all the outer decoder and the later channels read.
    skip = torch.zeros((c, h), dtype=torch.bool) if mask is None else mask.all(0).all(-1).cpu()
    if on_logits is not None:
        skip.zero_()
    skip = skip.tolist()

    with _sampling_mode(model, x, autocast, compile):
        like = torch.empty((), device=x.device,
                           dtype=torch.bfloat16 if autocast else next(model.parameters()).dtype)
        # Allocated once and reset: a decoding step writes into them and allocates nothing big.
        outer_caches = model.outer_decoder.new_caches(b * w, h, like)
        inner_caches = model.inner_decoder.new_caches(b, w, like)
        steps = (_CompiledSteps(model, temperature, x, outer_caches, inner_caches)
                 if compile else None)
        row_blocks = [_RowBlock.of(block) for block in model.inner_decoder.blocks]
        final_norm = _RowBlock.norm(model.final_norm)
        to_logits = _RowBlock.dense(model.to_logits)
        embed = model.pixel_embedding
        pos = model.positions()  # (H, W, D)
        no_pixel = pos.new_zeros((b, dim))  # shift_right's zero column
        bar = tqdm(total=c * h, unit="row", desc="sampling", disable=not progress)
        for ci in range(c):
            if all(skip[ci]):
                for _ in range(h):
                    next(rows)
                bar.update(h)
                continue
            ctx = model.channel_context(x, torch.full((b,), ci, device=x.device))  # (B, H, W, D)
            for cache in outer_caches:
                if cache is not None:
                    cache.reset()
            u = pos.new_zeros((b, w, dim))  # shift_down's zero row: row 0 sees no rows above
            for i in range(h):
                gumbel = next(rows)
                if i > 0:
                    # Row i-1 through the outer decoder; its masked column layers append it to
                    # their caches and attend to rows 0..i-1, the unmasked row layers see it whole.
                    above = embed(x[:, ci, i - 1]) + pos[i - 1] + ctx[:, i - 1]  # (B, W, D)
                    if steps is not None:
                        u = steps.outer(above, i - 1)
                    else:
                        u = model.outer_decoder(above[:, None], outer_caches)[:, 0]
                if skip[ci][i]:
                    bar.update()
                    continue
                row_inputs = u + pos[i] + ctx[:, i]  # (B, W, D): everything but shift_right(h)
                row_mask = mask[:, ci, i] if mask is not None else None
                for cache in inner_caches:
                    cache.reset()
                h_left = no_pixel
                x_row = x[:, ci, i]  # (B, W), a view: draws land in x
                if steps is not None:
                    steps.draw_row(row_inputs, gumbel, row_mask, x_row, on_logits, ci, i)
                    bar.update()
                    continue
                for j in range(w):
                    r = _inner_step(row_blocks, inner_caches, h_left + row_inputs[:, j])
                    logits = _dense(F.layer_norm(r, (dim,), *final_norm), to_logits)
                    if on_logits is not None:
                        on_logits(ci, i, j, at_least_fp32(logits))
                    drawn = _draw(logits, gumbel[:, j], temperature)
                    if row_mask is not None:
                        drawn = torch.where(row_mask[:, j], x_row[:, j], drawn)
                    x_row[:, j] = drawn
                    h_left = F.embedding(drawn, embed.weight)
                bar.update()
        bar.close()
    return _output(x, model.config.levels)
