"""Multi-head self-attention along one axis of a feature map, and its cached decoding step.

Axis letters: b batch, h rows, w columns, n heads, e features per head, t positions along the
attended axis (the other spatial axis is folded into the batch).

Two ways compute the same attention, chosen by name (`AttentionPath`):
  "sdpa"    torch's `scaled_dot_product_attention`, the fused kernels every GPU run takes;
  "matmul"  plain matmuls with the backward written out (`FoldedAttention`), faster on a CPU for
            axes up to `MATMUL_MAX_LEN` long and in bf16 (docs/benchmarks.md);
  "auto"    "matmul" where it is faster, "sdpa" everywhere else.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .runtime import softmax_backward_kernel

Axis = Literal["row", "column"]
AttentionPath = Literal["auto", "sdpa", "matmul"]
ATTENTION_PATHS = ("auto", "sdpa", "matmul")

# CUDA's flash and memory-efficient SDPA kernels put the folded batch (and the heads) on a grid
# axis limited to 65,535 blocks; past it they fail or fall back to the slow math kernel, depending
# on the torch version. Attention over the rows of a 64x64 batch of 64 already folds 4,096 x 16
# heads, so the folded batch is split below the limit.
MAX_FOLDED_BATCH = 65_535

# On the CPU, axes up to this long attend faster through plain matmuls than through the fused
# kernel, whose backward is slow at these lengths; longer axes keep the fused kernel, which never
# materialises the [t, t] scores.
MATMUL_MAX_LEN = 64
# A decoding step (one query per sequence) of fewer sequences than this is cheaper as one fused
# call than as the matmuls' separate ops, in eager mode.
FUSED_STEP_BELOW = 8


def uses_matmuls(
    q: Tensor, length: int, path: AttentionPath = "auto", matmul_max_len: int = MATMUL_MAX_LEN
) -> bool:
    """Whether attention over axes of `length` runs through plain matmuls: always for "matmul",
    never for "sdpa"; for "auto" on the CPU, in bf16 or up to `matmul_max_len` long."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
    if path != "auto":
        return path == "matmul"
    return q.device.type == "cpu" and (q.dtype == torch.bfloat16 or length <= matmul_max_len)


def step_path(path: AttentionPath, sequences: int) -> AttentionPath:
    """The path of a decoding step of `sequences` queries: "auto" takes SDPA in eager mode for
    fewer than FUSED_STEP_BELOW of them; compiled, the matmuls fuse with what surrounds them."""
    if path == "auto" and sequences < FUSED_STEP_BELOW and not torch.compiler.is_compiling():
        return "sdpa"
    return path


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    path: AttentionPath = "auto",
    scale: float | None = None,
    bias: Tensor | None = None,
    matmul_max_len: int = MATMUL_MAX_LEN,
) -> Tensor:
    """Attention over [N, heads, t, e] by `path`. `scale` multiplies the scores (default
    1/sqrt(e)); `bias` [1, t_k] is added to every row of scores (a decoding step's mask)."""
    if uses_matmuls(q, k.shape[2], path, matmul_max_len):
        return explicit_attention(q, k, v, causal, scale, bias)
    return chunked_sdpa(q, k, v, causal, MAX_FOLDED_BATCH, scale, bias)


def chunked_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    max_folded: int,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """SDPA in pieces of the folded batch, so that no call folds more than `max_folded` x heads."""
    heads = q.shape[1]
    step = max(1, max_folded // heads)
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
    return torch.zeros(t_q, t_k, dtype=like.dtype, device=like.device).masked_fill_(
        future, float("-inf")
    )


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """softmax(scale * q k^T + bias) v over [..., t, e], for short axes: the [t, t] scores are
    small enough to materialise. The leading axes fold into one batch, so that the scale and the
    masks ride along in one `baddbmm`."""
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
    return torch.bmm(softmax(scores).to(v.dtype), v3).view(*q.shape[:-1], v.shape[-1])


# torch's CPU softmax kernels vectorise bf16 along rows in chunks of 32: shorter rows take a
# scalar path, several times slower than fp32 (docs/benchmarks.md). Those rows go through fp32.
BF16_SOFTMAX_MIN_LEN = 32


def softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis, in the scores' dtype (bf16 in: accumulated in fp32 inside
    torch's kernel, bit for bit the fp32 softmax rounded to bf16)."""
    if scores.dtype == torch.bfloat16 and scores.shape[-1] < BF16_SOFTMAX_MIN_LEN:
        return scores.float().softmax(-1).to(scores.dtype)
    return scores.softmax(-1)


def softmax_backward(grad: Tensor, p: Tensor) -> Tensor:
    """d scores = p * (grad - sum(grad * p)) for p = softmax(scores)."""
    if p.dtype == torch.bfloat16 and p.shape[-1] < BF16_SOFTMAX_MIN_LEN:
        return softmax_backward(grad.float(), p.float()).to(p.dtype)
    return softmax_backward_kernel(grad, p)


class FoldedAttention(torch.autograd.Function):
    """Attention along the rows or the columns of fused q, k, v [B, H, W, 3, heads, e], through
    plain matmuls, forward and backward written out for the layouts.

    Autograd through folding views would copy q, k and v for the matmuls, then gather the three
    gradients back into the projection's layout with a strided `cat`. Here the forward folds q,
    k, v in one copy, and the backward writes their gradients into one folded buffer and unfolds
    it in one copy. Queries come scaled (the scale is folded into the projection), and the causal
    mask is added inside the score matmul.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, axis: Axis, causal: bool) -> Tensor:  # type: ignore[override]
        b, _, _, _, heads, _ = qkv.shape
        fold, unfold = FOLDS[axis]
        with torch.autocast(qkv.device.type, enabled=False):  # every operand is in qkv's dtype
            q, k, v = rearrange(qkv, fold).contiguous()
            t = q.shape[1]
            if causal:
                scores = torch.baddbmm(causal_bias(t, t, q), q, k.mT)
            else:
                scores = torch.bmm(q, k.mT)
            p = softmax(scores)
            out = torch.bmm(p, v)
        ctx.save_for_backward(q, k, v, p)
        ctx.axis, ctx.b, ctx.heads = axis, b, heads
        return rearrange(out[None], unfold, b=b, n=heads).reshape(*qkv.shape[:3], -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        q, k, v, p = ctx.saved_tensors
        fold, unfold = FOLDS[ctx.axis]
        g = rearrange(grad.unflatten(-1, (ctx.heads, -1))[:, :, :, None], fold)[0].contiguous()
        grad_qkv = q.new_empty((3, *q.shape))
        torch.bmm(p.mT, g, out=grad_qkv[2])
        grad_scores = softmax_backward(torch.bmm(g, v.mT), p)
        torch.bmm(grad_scores, k, out=grad_qkv[0])
        torch.bmm(grad_scores.mT, q, out=grad_qkv[1])
        return rearrange(grad_qkv, unfold, b=ctx.b, n=ctx.heads).contiguous(), None, None


# einops patterns between [B, H, W, 3, heads, e] and q, k, v folded to [3, N, t, e].
FOLDS = {
    "row": ("b h w i n e -> i (b h n) w e", "i (b h n) w e -> b h w i n e"),
    "column": ("b h w i n e -> i (b w n) h e", "i (b w n) h e -> b h w i n e"),
}


# ------------------------------------------------------------------------------------------------
# Decoding one position at a time.


class Position(NamedTuple):
    """The position a decoding step writes along the cached axis, and the keys it may see."""

    index: Tensor  # [1] long
    bias: Tensor  # [1, T]: 0 at cache positions <= index, -inf after them


def decoding_positions(length: int, like: Tensor) -> list[Position]:
    """Position 0..length-1 of an axis, made once per decoding run: a step then builds no mask."""
    t = torch.arange(length, device=like.device)
    bias = torch.zeros((length, length), dtype=like.dtype, device=like.device)
    bias.masked_fill_(t[None, :] > t[:, None], float("-inf"))
    return [Position(t[i : i + 1], bias[i : i + 1]) for i in range(length)]


class AxialSelfAttention(nn.Module):
    """Self-attention along the rows or the columns of a [B, H, W, D] tensor.

    Row attention lets each pixel see its row; column attention its column. `causal=True` masks
    the future along that axis (lower-triangular, diagonal included: the decoders' shifts make the
    model strictly causal, paper section 4.2).
    """

    def __init__(
        self, dim: int, heads: int, axis: Axis, causal: bool = False, path: AttentionPath = "auto"
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if axis not in ("row", "column"):
            raise ValueError(f"axis must be 'row' or 'column', got {axis!r}")
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
        self.heads, self.axis, self.causal, self.path = heads, axis, causal, path
        self.head_dim = dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)  # fused: one matmul instead of three
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, cache: Tensor | None = None, position: Position | None = None
    ) -> Tensor:
        """x: [B, H, W, D] -> [B, H, W, D].

        With a `cache` (from `new_cache`), x holds ONE new position along the attended axis, at
        `position`: its keys and values are written into the cache there, and it attends to the
        cache's positions up to and including it.
        """
        if cache is not None:
            return self.decode(x, cache, position)
        b = x.shape[0]
        qkv = self.project(x)
        if uses_matmuls(qkv, x.shape[2 if self.axis == "row" else 1], self.path):
            return self.to_out(FoldedAttention.apply(qkv, self.axis, self.causal))
        # Splitting q, k, v before folding lets the backward stack their gradients straight into
        # the projection's layout (folding the fused tensor costs a concatenation plus a copy).
        fold = "b h w n e -> (b h) n w e" if self.axis == "row" else "b h w n e -> (b w) n h e"
        q, k, v = (rearrange(t, fold) for t in qkv.unbind(3))
        out = attend(q, k, v, self.causal, self.path, scale=1.0)
        if self.axis == "row":
            return self.to_out(rearrange(out, "(b h) n w e -> b h w (n e)", b=b))
        return self.to_out(rearrange(out, "(b w) n h e -> b h w (n e)", b=b))

    def decode(self, x: Tensor, cache: Tensor, position: Position) -> Tensor:
        """One decoding step: x [B, H, W, D] with length 1 along the axis -> [B, H, W, D]. With
        the axis of length 1, folding the other axis into the batch is a view: [B, H, W] -> N =
        B*H*W in the cache's order. Functional calls: a step holds a few tokens, and module
        calls would cost more than their arithmetic."""
        if x.shape[2 if self.axis == "row" else 1] != 1:
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
        out = attend(qkv.select(0, 0), keys, values, False, step_path(self.path, n),
                     bias=position.bias)
        return F.linear(out.view(x.shape), self.to_out.weight, self.to_out.bias)

    def project(self, x: Tensor) -> Tensor:
        """[B, H, W, D] -> fused q, k, v [B, H, W, 3, heads, e], the queries scaled by 1/sqrt(e).
        The scale goes where it costs least: into the [3D, D] weights when the tokens outnumber
        the weights' entries (training, evaluation: it then costs nothing next to scaling every
        score, forward and backward), onto the queries when a few tokens come (decoding)."""
        shape = (*x.shape[:-1], 3, self.heads, self.head_dim)
        if x.numel() >= self.to_qkv.weight.numel():
            return F.linear(x, *self.scaled_qkv()).view(shape)
        qkv = F.linear(x, self.to_qkv.weight, self.to_qkv.bias).view(shape)
        qkv.select(-3, 0).mul_(self.head_dim**-0.5)  # a fresh tensor, not saved for backward
        return qkv

    def scaled_qkv(self) -> tuple[Tensor, Tensor]:
        """The fused projection's (weight [3D, D], bias [3D]), query rows times 1/sqrt(e)."""
        scale, dim = self.head_dim**-0.5, self.to_out.in_features
        (w_q, w_kv), (b_q, b_kv) = (p.split([dim, 2 * dim]) for p in self.to_qkv.parameters())
        return torch.cat([w_q * scale, w_kv]), torch.cat([b_q * scale, b_kv])

    def new_cache(self, folded_batch: int, length: int, like: Tensor) -> Tensor:
        """Keys and values of `length` positions for a folded batch, [2, N, heads, T, e], zeros:
        positions not written yet are masked, and their weight 0 must not meet a NaN."""
        return like.new_zeros((2, folded_batch, self.heads, length, self.head_dim))
