"""The fast sampler's two decoding steps as static-shape graphs for torch.compile
(`sample(..., compile=True)`).

At batch 1 a subpixel is 17 matrix-vector products (4 inner blocks and the logits layer) and some
80 small ops; in eager mode the small ops and Python cost as much as the products. `PixelStep`
does a whole subpixel, from the inner decoder's input to the drawn value and its embedding, and
`OuterRowStep` advances the outer decoder by one row, each as one graph that torch.compile can
fuse and, with frozen weights, whose products it can pack. Their arithmetic is that of
`AxialBlock` with a key/value cache, as in the eager sampler.

Static shapes: a cache always has room for the whole axis, and the query at position t attends to
positions <= t through a mask. Positions past t hold values of an earlier row or channel, or
zeros; they are finite, so their masked weights are exactly zero.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import AxialBlock, AxialTransformer


def cached_block(block: AxialBlock, r: Tensor, cache: Tensor, position: Tensor) -> Tensor:
    """A masked block on one new position per token: r [N, D] -> [N, D]. The keys and values of
    r are written into cache [N, 2, heads, T, e] at `position` (a 0-d long), and r attends to the
    cache's positions <= `position`. Eval mode: no dropout."""
    attn = block.attn
    n, d = r.shape
    qkv = attn.to_qkv(block.attn_norm(r)).view(n, 3, attn.heads, 1, attn.head_dim)
    cache.index_copy_(3, position.view(1), qkv[:, 1:])
    q = qkv[:, 0] * attn.head_dim**-0.5  # [N, heads, 1, e]
    future = torch.arange(cache.shape[3], device=r.device) > position
    scores = (q @ cache[:, 0].transpose(-1, -2)).masked_fill(future, float("-inf"))
    r = r + attn.to_out((scores.softmax(-1) @ cache[:, 1]).view(n, d))
    return r + block.mlp(block.mlp_norm(r))


class PixelStep(nn.Module):
    """One subpixel: inner decoder, logits, Gumbel-max draw, the drawn value's embedding."""

    def __init__(self, model: AxialTransformer) -> None:
        super().__init__()
        self.blocks = model.inner_decoder.blocks
        self.final_norm, self.to_logits = model.final_norm, model.to_logits
        self.pixel_embedding = model.pixel_embedding

    def forward(
        self,
        h_left: Tensor,
        row_inputs: Tensor,
        caches: list[Tensor],
        column: Tensor,
        gumbel: Tensor,
        temperature: Tensor,
        keep: Tensor,
        x_row: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Draw x_row[:, column] in place -> (its embedding [B, D], logits [B, V]).

        h_left [B, D] the embedding of the pixel on the left (zeros at column 0); row_inputs
        [B, W, D] everything else the inner decoder sees; caches[l] [B, 2, heads, W, e]; column
        a 0-d long; gumbel [B, W, V]; temperature 0-d; keep [B, W] bool: pixels of x_row [B, W]
        to keep. Whole rows go in so that a step slices nothing in Python.
        """
        index = column.view(1)
        r = h_left + row_inputs.index_select(1, index)[:, 0]
        for block, cache in zip(self.blocks, caches, strict=True):
            r = cached_block(block, r, cache, column)
        logits = self.to_logits(self.final_norm(r))
        scores = logits.to(gumbel.dtype) / temperature + gumbel.index_select(1, index)[:, 0]
        drawn = torch.where(keep.index_select(1, index), x_row.index_select(1, index),
                            scores.argmax(-1, keepdim=True))
        x_row.index_copy_(1, index, drawn)
        return F.embedding(drawn[:, 0], self.pixel_embedding.weight), logits


class OuterRowStep(nn.Module):
    """One row through the outer decoder: unmasked row blocks see the row whole, masked column
    blocks append it to their caches over the rows."""

    def __init__(self, model: AxialTransformer) -> None:
        super().__init__()
        self.blocks = model.outer_decoder.blocks

    def forward(self, x: Tensor, caches: list[Tensor | None], row: Tensor) -> Tensor:
        """x [B, W, D] (row `row`, a 0-d long); caches[l] [B*W, 2, heads, H, e] or None for
        unmasked blocks -> [B, W, D]."""
        b, w, d = x.shape
        for block, cache in zip(self.blocks, caches, strict=True):
            if cache is None:
                x = block(x[:, None])[:, 0]
            else:
                x = cached_block(block, x.reshape(b * w, d), cache, row).view(b, w, d)
        return x


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or written in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


# The model and weights the graphs were last compiled for, and the compiled forwards.
_compiled: tuple[weakref.ref, tuple, tuple[Callable, Callable]] | None = None


def compiled_steps(model: AxialTransformer) -> tuple[Callable, Callable]:
    """The compiled forwards of `OuterRowStep(model)` and `PixelStep(model)`.

    The weights are frozen into the graphs as constants, and dynamo's guards do not look at
    tensor values: a graph compiled before the weights changed (an optimizer step, a loaded
    checkpoint) would go on sampling from the old ones, and one compiled for another model could
    pass its guards. So the graphs are kept for one model whose parameters are the same tensors
    at the same versions (every in-place write bumps a tensor's version), and otherwise
    compiled afresh. A new batch size recompiles through dynamo's shape guards.
    """
    global _compiled
    weights = weights_key(model)
    if _compiled is not None and _compiled[0]() is model and _compiled[1] == weights:
        return _compiled[2]
    for step in (OuterRowStep, PixelStep):
        torch._dynamo.reset_code(step.forward.__code__)
    # Compiling the bound forwards skips nn.Module.__call__ and its hooks on every step.
    steps = tuple(torch.compile(step(model).forward, fullgraph=True, dynamic=False)
                  for step in (OuterRowStep, PixelStep))
    _compiled = (weakref.ref(model), weights, steps)
    return steps
