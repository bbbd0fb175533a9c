"""Multi-head self-attention along one axis of a channels-last map [B, *S, D], and its cached
decoding step: the model's attention, and the drop-in CNN layers' (layers.py).

Axis letters: b batch, n heads, e features per head, t positions along the attended axis (the
other spatial axes are folded into the batch).

Two ways compute the same attention, chosen by name (`AttentionPath`):
  "sdpa"    torch's `scaled_dot_product_attention`, its fused kernels;
  "matmul"  plain matmuls (`explicit_attention`), the scores materialised;
  "auto"    "sdpa", except in a decoding step compiled for the CPU, where inductor fuses the
            matmuls with the mask and the softmax around them. On the CPU the matmuls no longer
            beat SDPA elsewhere, on AVX2 nor on AVX-512 (docs/benchmarks.md, "CPU speed paths").
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Axis = Literal["row", "column"] | int
AttentionPath = Literal["auto", "sdpa", "matmul"]
ATTENTION_PATHS = ("auto", "sdpa", "matmul")
IMAGE_AXES = {"column": 0, "row": 1}  # of an image [B, H, W, D]: a row attends along W

# CUDA's flash and memory-efficient SDPA kernels put the folded batch (and the heads) on a grid
# axis limited to 65,535 blocks; past it they fail or fall back to the slow math kernel, depending
# on the torch version. Attention over the rows of a 64x64 batch of 64 already folds 4,096 x 16
# heads, so the folded batch is split below the limit.
MAX_FOLDED_BATCH = 65_535


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, path: AttentionPath = "auto",
           scale: float | None = None, bias: Tensor | None = None) -> Tensor:
    """Attention over [N, heads, t, e] by `path` ("auto" takes matmuls in a decoding step, one
    query, compiled for the CPU). `scale` multiplies the scores (default 1/sqrt(e)); `bias`
    [1, t_k] is added to every row of scores (a decoding step's mask). SDPA runs in pieces of
    the folded batch, so that no call folds more than MAX_FOLDED_BATCH x heads."""
    if path == "matmul" or (path == "auto" and q.device.type == "cpu" and q.shape[-2] == 1
                            and torch.compiler.is_compiling()):
        return explicit_attention(q, k, v, causal, scale, bias)
    step = max(1, MAX_FOLDED_BATCH // q.shape[1])
    if q.shape[0] <= step:
        return F.scaled_dot_product_attention(q, k, v, bias, is_causal=causal, scale=scale)
    chunks = zip(q.split(step), k.split(step), v.split(step), strict=True)
    return torch.cat(
        [F.scaled_dot_product_attention(*c, bias, is_causal=causal, scale=scale) for c in chunks]
    )


def causal_bias(t_q: int, t_k: int, like: Tensor) -> Tensor:
    """[t_q, t_k]: 0 where a query may see a key, -inf above the diagonal. Aligned bottom-right:
    the last query sees every key (is_causal's mask when t_q == t_k)."""
    future = torch.ones(t_q, t_k, dtype=torch.bool, device=like.device).triu(t_k - t_q + 1)
    return like.new_zeros(t_q, t_k).masked_fill_(future, float("-inf"))


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                       scale: float | None = None, bias: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T + bias) v over [..., t, e], for short axes: the [t, t] scores are
    small enough to materialise."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if causal:
        mask = causal_bias(q.shape[-2], k.shape[-2], q)
        bias = mask if bias is None else bias + mask
    q3, k3, v3 = (z.reshape(-1, *z.shape[-2:]) for z in (q, k, v))
    # Not one baddbmm: compiled, it stays an external call, where a bmm of one query (a decoding
    # step) becomes a kernel of inductor's own that the mask and the softmax fuse into.
    scores = torch.bmm(q3, k3.mT).mul_(scale)
    if bias is not None:
        scores.add_(bias)
    return torch.bmm(scores.softmax(-1).to(v.dtype), v3).view(*q.shape[:-1], v.shape[-1])


class Position(NamedTuple):
    """The position a decoding step writes along the cached axis, and the keys it may see."""

    index: Tensor  # [1] long
    bias: Tensor  # [1, T]: 0 at cache positions <= index, -inf after them


def decoding_positions(length: int, like: Tensor) -> list[Position]:
    """Position 0..length-1 of an axis, made once per decoding run: a step then builds no mask."""
    t, bias = torch.arange(length, device=like.device), causal_bias(length, length, like)
    return [Position(t[i : i + 1], bias[i : i + 1]) for i in range(length)]


class AxialSelfAttention(nn.Module):
    """Self-attention along one spatial axis of a channels-last [B, *S, D] tensor: `axis` is its
    index in S, or "row" or "column" of an image [B, H, W, D]. `causal=True` masks the future
    along that axis (lower-triangular, diagonal included: the decoders' shifts make the model
    strictly causal, paper section 4.2).
    """

    def __init__(self, dim: int, heads: int, axis: Axis, causal: bool = False,
                 path: AttentionPath = "auto") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if IMAGE_AXES.get(axis, axis) not in range(2**16):
            raise ValueError(f"axis must be 'row', 'column' or a spatial axis, got {axis!r}")
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
        self.heads, self.axis, self.causal, self.path = heads, axis, causal, path
        self.head_dim = dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)  # fused: one matmul instead of three
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: Tensor | None = None,
                position: Position | None = None) -> Tensor:
        """x: [B, *S, D] -> [B, *S, D]. With a `cache` (from `new_cache`), x holds ONE new
        position along the attended axis, at `position`: its keys and values are written into
        the cache there, and it attends to the cache's positions up to and including it."""
        if cache is not None:
            return self.decode(x, cache, position)
        return self.to_out(self.attention(self.project(x)))

    def attention(self, qkv: Tensor) -> Tensor:
        """Fused q, k, v [B, *S, 3, heads, e] (queries scaled) -> [B, *S, D] before `to_out`.
        The attended axis moves next to the features and the others fold into the batch: a view
        for the last spatial axis, a copy for the others (the [3, heads, e] layout of the weights
        keeps the heads from folding with a spatial axis)."""
        axis = 1 + IMAGE_AXES.get(self.axis, self.axis)
        # Splitting q, k, v before folding lets the backward stack their gradients straight into
        # the projection's layout (folding the fused tensor costs a concatenation plus a copy).
        q, k, v = (z.movedim(axis, -2) for z in qkv.unbind(-3))  # [B, *others, n, t, e]
        out = attend(*(z.reshape(-1, *z.shape[-3:]) for z in (q, k, v)), self.causal, self.path,
                     scale=1.0)
        return out.view(q.shape).movedim(-2, axis).flatten(-2)

    def decode(self, x: Tensor, cache: Tensor, position: Position) -> Tensor:
        """One decoding step: x [B, *S, D] with length 1 along the axis. Folding the other axes
        into the batch is then a view, N = B * prod(S) in the cache's order. Functional calls: a
        step holds a few tokens, and module calls would cost more than their arithmetic."""
        if x.shape[1 + IMAGE_AXES.get(self.axis, self.axis)] != 1:
            raise ValueError(f"a decoding step takes one new position along the {self.axis} "
                             f"axis, got input of shape {list(x.shape)}")
        n = x.numel() // x.shape[-1]
        qkv = F.linear(x, self.to_qkv.weight, self.to_qkv.bias).view(n, 3, self.heads, 1, -1)
        qkv = qkv.transpose(0, 1)  # [3, N, heads, 1, e]
        cache.index_copy_(3, position.index, qkv.narrow(0, 1, 2))
        # The cache holds this position and, masked by the bias, what follows it (earlier rows'
        # values, or zeros): so the step attends to all of it, not causally. SDPA's is_causal
        # would align its mask top-left and let this one query see only key 0.
        keys, values = cache.unbind(0)
        out = attend(qkv.select(0, 0), keys, values, False, self.path, bias=position.bias)
        return F.linear(out.view(x.shape), self.to_out.weight, self.to_out.bias)

    def project(self, x: Tensor) -> Tensor:
        """[B, *S, D] -> fused q, k, v [B, *S, 3, heads, e], the queries scaled by 1/sqrt(e).
        The scale goes where it costs least: into the [3D, D] weights when the tokens outnumber
        the weights' entries (training, evaluation), onto the queries when a few tokens come."""
        shape = (*x.shape[:-1], 3, self.heads, self.head_dim)
        if x.numel() >= self.to_qkv.weight.numel():
            return F.linear(x, *self.scaled_qkv()).view(shape)
        qkv = F.linear(x, *self.qkv_parameters()).view(shape)
        qkv.select(-3, 0).mul_(self.head_dim**-0.5)  # a fresh tensor, not saved for backward
        return qkv

    def scaled_qkv(self) -> tuple[Tensor, Tensor]:
        """The fused projection's (weight [3D, D], bias [3D]), query rows times 1/sqrt(e)."""
        scale, dim = self.head_dim**-0.5, self.to_out.in_features
        (w_q, w_kv), (b_q, b_kv) = (p.split([dim, 2 * dim]) for p in self.qkv_parameters())
        return torch.cat([w_q * scale, w_kv]), torch.cat([b_q * scale, b_kv])

    def qkv_parameters(self) -> tuple[Tensor, Tensor]:
        """The fused projection's (weight [3D, D], bias [3D]), rows in [3, heads, e] order."""
        return self.to_qkv.weight, self.to_qkv.bias

    def new_cache(self, folded_batch: int, length: int, like: Tensor) -> Tensor:
        """Keys and values of `length` positions for a folded batch, [2, N, heads, T, e], zeros:
        positions not written yet are masked, and their weight 0 must not meet a NaN."""
        return like.new_zeros((2, folded_batch, self.heads, length, self.head_dim))


def set_attention_path(model: nn.Module, path: AttentionPath) -> None:
    """How every attention layer of `model` computes: a run-time choice, never saved."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {path!r}")
    for module in model.modules():
        if isinstance(module, AxialSelfAttention):
            module.path = path
