"""Axial attention as a drop-in layer for CNN feature maps and any N-d tensor.

Axial attention (Ho et al. 2019, section 3) attends along one spatial axis at a time: for an
[H, W] map that is H*W*(H+W) scores instead of (H*W)^2. These layers take tensors as a CNN holds
them, channels first ([B, C, H, W], video [B, C, T, H, W]) or channels last (`dim_index=-1`),
and return the same layout. Their attention along one axis is the model's
(`model.attention.AxialSelfAttention`), and their block is the model's (`model.blocks.AxialBlock`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .model.attention import AxialSelfAttention
from .model.blocks import AxialBlock, layer_norm

__all__ = [
    "AxialAttention",
    "AxialAttentionBlock",
    "AxialPositionalEmbedding",
    "AxisAttention",
    "ChannelAttention",
]


class FeatureMapLayer:
    """What the layers of [B, ...] tensors share: `num_dimensions` spatial axes and `dim`
    features on axis `dim_index`, which may be any axis but the batch. A mixin, so that the
    block can be the model's `AxialBlock` as well."""

    def set_layout(self, dim: int, num_dimensions: int, dim_index: int) -> None:
        total = num_dimensions + 2
        if num_dimensions < 1:
            raise ValueError(f"num_dimensions must be at least 1, got {num_dimensions}")
        if not -total < dim_index < total or dim_index % total == 0:
            raise ValueError(f"dim_index must name a non-batch axis of a {total}-d tensor "
                             f"(1..{total - 1} or -{total - 1}..-1), got {dim_index}")
        self.dim, self.num_dimensions, self.dim_index = dim, num_dimensions, dim_index % total

    def check(self, x: Tensor) -> None:
        if x.ndim != self.num_dimensions + 2:
            raise ValueError(f"expected a {self.num_dimensions + 2}-d tensor (batch, features and "
                             f"{self.num_dimensions} spatial axes), got shape {tuple(x.shape)}")
        if x.shape[self.dim_index] != self.dim:
            raise ValueError(f"expected {self.dim} features on axis {self.dim_index}, got shape "
                             f"{tuple(x.shape)}")


class AxisAttention(AxialSelfAttention):
    """The model's attention along spatial axis `axis` of a [B, *S, D] tensor (channels last)
    or a [B, D, *S] tensor (`channels_first=True`).

    The layers' saved weights keep their own order of the fused projection's rows, [heads, 3, e]
    (the model's is [3, heads, e]): weights saved by earlier versions load and compute the same
    function. Reordering them costs one copy of the [3D, D] weights per call.
    """

    def __init__(
        self, dim: int, heads: int, axis: int, num_dimensions: int = 2, causal: bool = False
    ) -> None:
        if not 0 <= axis < num_dimensions:
            raise ValueError(f"axis must be in 0..{num_dimensions - 1}, got {axis}")
        super().__init__(dim, heads, axis, causal)

    def forward(self, x: Tensor, channels_first: bool = False) -> Tensor:
        """x: [B, *S, D] -> [B, *S, D], or [B, D, *S] -> [B, D, *S] with `channels_first`."""
        if not channels_first:
            return super().forward(x)
        # A batched matmul reads the channels-first map transposed, and the output is a
        # channels-first view of a channels-last result: the map itself is never transposed.
        b, weight, bias = x.shape[0], *self.scaled_qkv()
        qkv = torch.baddbmm(bias.expand(b, math.prod(x.shape[2:]), -1), x.flatten(2).mT,
                            weight.T.expand(b, -1, -1))  # (B, N, 3D)
        out = self.attention(qkv.view(b, *x.shape[2:], 3, self.heads, self.head_dim))
        return self.to_out(out).movedim(-1, 1)

    def qkv_parameters(self) -> tuple[Tensor, Tensor]:
        """The rows of `to_qkv`, stored [heads, 3, e], in the model's [3, heads, e] order."""
        n, e = self.heads, self.head_dim
        return (self.to_qkv.weight.view(n, 3, e, -1).transpose(0, 1).reshape(3 * n * e, -1),
                self.to_qkv.bias.view(n, 3, e).transpose(0, 1).reshape(-1))


class AxialAttention(FeatureMapLayer, nn.Module):
    """Self-attention along each spatial axis of an N-d tensor, one set of weights per axis.

    `sum_axes=True` runs the axes in parallel on the same input and sums them (the outputs of
    row and column attention of an image); `sum_axes=False` applies them in sequence, each to
    the previous one's output. Both return the attention output only: the caller adds the
    residual (`AxialAttentionBlock` does). `causal` masks the future along an axis (a bool for
    every axis or one per spatial axis), lower-triangular with the diagonal included.
    """

    def __init__(self, dim: int, heads: int, num_dimensions: int = 2, dim_index: int = 1,
                 causal: bool | Sequence[bool] = False, sum_axes: bool = True) -> None:
        super().__init__()
        self.set_layout(dim, num_dimensions, dim_index)
        if isinstance(causal, bool):
            causal = (causal,) * num_dimensions
        causal = tuple(causal)
        if len(causal) != num_dimensions or not all(isinstance(c, bool) for c in causal):
            raise ValueError(f"causal must be a bool or {num_dimensions} bools (one per spatial "
                             f"axis), got {causal}")
        self.sum_axes, self.causal = sum_axes, causal
        self.axes = nn.ModuleList(
            AxisAttention(dim, heads, axis, num_dimensions, c) for axis, c in enumerate(causal)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, ...] with `dim` features on axis `dim_index` -> the same shape and layout."""
        self.check(x)
        # Channels first and channels last run as they are; features anywhere else move last.
        channels_first = self.dim_index == 1
        as_is = channels_first or self.dim_index == x.ndim - 1
        h = x if as_is else x.movedim(self.dim_index, -1)
        if self.sum_axes:
            out = self.axes[0](h, channels_first)
            for axis_attention in self.axes[1:]:
                out = out + axis_attention(h, channels_first)
        else:
            out = h
            for axis_attention in self.axes:
                out = axis_attention(out, channels_first)
        return out.contiguous() if as_is else out.movedim(-1, self.dim_index).contiguous()


class AxialPositionalEmbedding(FeatureMapLayer, nn.Module):
    """Learned positions, additively factorised: one [S_a, D] table per spatial axis, their
    broadcast sum added to the input (Ho et al. 2019 use pos_h + pos_w).

    `shape` is the spatial shape the input must have. Tables start at N(0, (5/sqrt(D))^2), the
    official `emb_init` (axial/transformers.py).
    """

    def __init__(self, dim: int, shape: Sequence[int], dim_index: int = 1) -> None:
        shape = tuple(shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"shape must be the positive spatial sizes, got {shape}")
        super().__init__()
        self.set_layout(dim, len(shape), dim_index)
        self.shape = shape
        spatial_axes = [a for a in range(1, len(shape) + 2) if a != self.dim_index]
        self.tables = nn.ParameterList()
        for size, axis in zip(shape, spatial_axes, strict=True):
            table_shape = [1] * (len(shape) + 2)
            table_shape[self.dim_index], table_shape[axis] = dim, size
            self.tables.append(nn.Parameter(torch.randn(table_shape) * (5 / math.sqrt(dim))))

    def forward(self, x: Tensor) -> Tensor:
        self.check(x)
        spatial = tuple(s for a, s in enumerate(x.shape[1:], 1) if a != self.dim_index)
        if spatial != self.shape:
            raise ValueError(f"expected spatial shape {self.shape}, got {spatial}")
        for table in self.tables:
            x = x + table
        return x


class ChannelAttention(FeatureMapLayer, nn.Module):
    """The channel attention module of DANet (Fu et al. 2019, section 3.3), for any N-d tensor.

    Each channel's whole feature map A_c (flattened) is compared with every other's:
    X = softmax_rows(A A^T) is a [C, C] affinity matrix, and every position mixes its channels
    with it: out = beta * X A + A, with beta learned and starting at 0 (so the module starts as
    the identity). This follows the paper's equation (3); the official code feeds the softmax
    max(E) - E instead, which favours the least similar channels. No projections: the maps are
    compared as they are, so the scores grow with the number of positions and the softmax
    sharpens on large maps, as in DANet. It pools over every position: never use it in a causal
    model.
    """

    def __init__(self, dim: int, num_dimensions: int = 2, dim_index: int = 1) -> None:
        super().__init__()
        self.set_layout(dim, num_dimensions, dim_index)
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, ...] with `dim` features on axis `dim_index` -> the same shape."""
        self.check(x)
        a = x.movedim(self.dim_index, -1).flatten(1, -2)  # (B, positions, C)
        affinity = torch.softmax(a.transpose(1, 2) @ a, dim=-1)  # (B, C, C), rows sum to 1
        mixed = (a @ affinity.transpose(1, 2)).view(x.movedim(self.dim_index, -1).shape)
        return x + self.beta * mixed.movedim(-1, self.dim_index)


class AxialAttentionBlock(FeatureMapLayer, AxialBlock):
    """The model's pre-norm block (`AxialBlock`: its norms and residual dropout) with axial
    attention and an MLP with exact GELU, for use between conv stages.

    Takes and returns the CNN's own layout ([B, C, H, W] by default):
        x = x + attn(norm(x))          sum_axes=True: every axis in parallel, one residual
        x = x + attn_a(norm_a(x))      sum_axes=False: one residual per axis, in sequence
        x = channel_attention(x)       channel_attention=True (its own learned residual)
        x = x + mlp(norm(x))
    LayerNorm is over channels at each position (not BatchNorm), so a causal block stays causal
    along its masked axes.
    """

    def __init__(self, dim: int, heads: int, num_dimensions: int = 2, dim_index: int = 1,
                 causal: bool | Sequence[bool] = False, sum_axes: bool = True,
                 mlp_ratio: float = 4.0, dropout: float = 0.0,
                 channel_attention: bool = False) -> None:
        # Inside the block the features are last; the block moves them once on the way in and out.
        attn = AxialAttention(dim, heads, num_dimensions, -1, causal, sum_axes)
        if channel_attention and any(attn.causal):
            raise ValueError("channel attention pools over every position: it cannot be causal")
        super().__init__(dim, attn, mlp_ratio, dropout)
        self.set_layout(dim, num_dimensions, dim_index)
        # In sequence, attn_norm is the first axis's norm; each later axis has its own.
        self.later_norms = nn.ModuleList(
            nn.LayerNorm(dim) for _ in attn.axes[1:] if not sum_axes
        )
        self.channel_attention = (
            ChannelAttention(dim, num_dimensions, -1) if channel_attention else None
        )
        # Exact GELU, as the layers have always had (the model's MLP is the official code's
        # sigmoid approximation): saved blocks keep computing the same function.
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # Blocks saved before they became the model's block named their attention norms
        # attn_norms.0, attn_norms.1, ...: the first is attn_norm, the others later_norms.
        old = f"{prefix}attn_norms."
        for key in [k for k in state_dict if k.startswith(old)]:
            index, name = key[len(old):].split(".", 1)
            new = "attn_norm" if index == "0" else f"later_norms.{int(index) - 1}"
            state_dict[f"{prefix}{new}.{name}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, ...] with `dim` features on axis `dim_index` -> the same shape and layout."""
        self.check(x)
        x = super().forward(x.movedim(self.dim_index, -1).contiguous())  # (B, *S, D)
        return x.movedim(-1, self.dim_index).contiguous()

    def attention(self, x: Tensor, cache: None = None, position: None = None) -> Tensor:
        """x plus the attention branches (and the channel attention), features last."""
        if self.attn.sum_axes:
            x = super().attention(x)
        else:
            norms = [self.attn_norm, *self.later_norms]
            for norm, axis_attention in zip(norms, self.attn.axes, strict=True):
                x = x + self.residual(axis_attention(layer_norm(x, norm)))
        return x if self.channel_attention is None else self.channel_attention(x)
