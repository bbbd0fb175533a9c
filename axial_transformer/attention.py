"""Multi-head self-attention along one axis of a feature map, with an optional key/value cache.

Axis letters: b batch, h rows, w columns, n heads, e features per head, t positions along the
attended axis (the other spatial axis is folded into the batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Axis = Literal["row", "column"]

# CUDA's flash and memory-efficient SDPA kernels put the folded batch (and the heads) on a grid
# axis limited to 65,535 blocks; past it they fail or fall back to the slow math kernel, depending
# on the torch version. Attention over the rows of a 64x64 batch of 64 already folds 4,096 x 16
# heads, so we split the folded batch below the limit.
MAX_CUDA_FOLDED_BATCH = 65_535


# On the CPU, axes up to this long attend faster through plain matmuls than through the fused
# kernel, whose backward is slow at these lengths: a training step of the "small" preset at
# 64x64x3 took 3.25 s instead of 3.49 s, and row + column attention forward and backward at
# 64x64 (batch 3, width 256, 2 threads) 344 instead of 394 ms. Longer axes keep the fused kernel,
# which never materialises the [t, t] scores.
EXPLICIT_MAX_LEN = 64


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    explicit_max_len: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention over [N, heads, t, e]: `scaled_dot_product_attention` (chunking N where CUDA
    needs it), or plain matmuls on the CPU where `uses_matmuls` says so. `scale` multiplies the
    scores (default 1/sqrt(e); 1.0 for queries scaled beforehand)."""
    if uses_matmuls(q, k.shape[2], explicit_max_len):
        return explicit_attention(q, k, v, causal, scale)
    if q.is_cuda:
        return chunked_sdpa(q, k, v, causal, MAX_CUDA_FOLDED_BATCH, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def uses_matmuls(q: Tensor, length: int, explicit_max_len: int | None = None) -> bool:
    """Whether attention over axes of `length` runs through plain matmuls: on the CPU, in bf16 or
    up to `explicit_max_len` (default `EXPLICIT_MAX_LEN`) long."""
    if explicit_max_len is None:
        explicit_max_len = EXPLICIT_MAX_LEN
    return q.device.type == "cpu" and (q.dtype == torch.bfloat16 or length <= explicit_max_len)


def chunked_sdpa(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, max_folded: int, scale: float | None = None
) -> Tensor:
    """SDPA in pieces of the folded batch, so that no call folds more than `max_folded` x heads."""
    heads = q.shape[1]
    step = max(1, max_folded // heads)
    if q.shape[0] <= step:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    chunks = zip(q.split(step), k.split(step), v.split(step), strict=True)
    return torch.cat(
        [F.scaled_dot_product_attention(*c, is_causal=causal, scale=scale) for c in chunks]
    )


def causal_bias(t_q: int, t_k: int, like: Tensor) -> Tensor:
    """[t_q, t_k]: 0 where a query may see a key, -inf above the diagonal. Aligned bottom-right:
    the last query sees every key (is_causal's mask when t_q == t_k)."""
    future = torch.ones(t_q, t_k, dtype=torch.bool, device=like.device).triu(t_k - t_q + 1)
    return torch.zeros(t_q, t_k, dtype=like.dtype, device=like.device).masked_fill_(
        future, float("-inf")
    )


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None = None
) -> Tensor:
    """softmax(scale * q k^T) v over [..., t, e], for short axes on the CPU.

    torch's fused CPU attention is slow in bf16: its backward took 41% of a bf16 training step
    at 32x32 (bench/model_bench.py), ten times the fp32 kernel. Axes are at most 64 long, so the
    [t, t] scores are small enough to materialise. The softmax of bf16 scores accumulates in
    fp32 inside torch's kernel and returns bf16, bit for bit the fp32 softmax rounded to bf16,
    without an fp32 copy of the scores to write and convert.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2)
    if scale != 1.0:
        scores = scores * scale
    if causal:
        scores = scores + causal_bias(*scores.shape[-2:], scores)
    return scores.softmax(-1).to(v.dtype) @ v


# torch's CPU softmax kernels vectorise bf16 along rows in chunks of 32: shorter rows (axes of
# 16) take a scalar path, 2.4x (forward) and 12x (backward) slower than fp32. Those rows go
# through fp32: [6144, 16, 16] scores took 3.8 + 6.4 ms in bf16, 2.3 + 1.4 ms through fp32.
BF16_SOFTMAX_MIN_LEN = 32


def softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis, in the scores' dtype."""
    if scores.dtype == torch.bfloat16 and scores.shape[-1] < BF16_SOFTMAX_MIN_LEN:
        return scores.float().softmax(-1).to(scores.dtype)
    return scores.softmax(-1)


def softmax_backward(grad: Tensor, p: Tensor) -> Tensor:
    """d scores = p * (grad - sum(grad * p)) for p = softmax(scores): torch's fused kernel, the
    one autograd runs."""
    if p.dtype == torch.bfloat16 and p.shape[-1] < BF16_SOFTMAX_MIN_LEN:
        return softmax_backward(grad.float(), p.float()).to(p.dtype)
    return torch.ops.aten._softmax_backward_data(grad, p, -1, p.dtype)


class FoldedAttention(torch.autograd.Function):
    """Attention along the rows or the columns of fused q, k, v [B, H, W, 3, heads, e], through
    plain matmuls, forward and backward written out for the layouts.

    Autograd through folding views would copy q, k and v for the matmuls, then gather the three
    gradients back into the projection's layout with a strided `cat` (9% of a training step at
    64x64). Here the forward folds q, k, v in one copy, and the backward writes their gradients
    into one folded buffer and unfolds it in one copy. Queries come scaled (the scale is folded
    into the projection), and the causal mask is added inside the score matmul.
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


class KVCache:
    """Keys and values of the positions decoded so far along one axis, preallocated.

    Buffers are written in place, so a decoding step allocates nothing: at batch 1 the sampler is
    bound by per-step overhead, not arithmetic.
    """

    def __init__(
        self, folded_batch: int, heads: int, max_len: int, head_dim: int, like: Tensor
    ) -> None:
        # Keys and values share one buffer, so a fused projection's k and v land in one copy.
        self.kv = like.new_empty((folded_batch, 2, heads, max_len, head_dim))
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append [N, heads, L, e] keys and values; return all of them so far."""
        return self.append_pair(torch.stack([k, v], dim=1))

    def append_pair(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Append keys and values stacked as [N, 2, heads, L, e]; return all of them so far."""
        end = self.length + kv.shape[3]
        if end > self.kv.shape[3]:
            raise ValueError(f"KV cache holds {self.kv.shape[3]} positions; {end} were written")
        self.kv[:, :, :, self.length : end] = kv
        self.length = end
        return self.kv[:, 0, :, :end], self.kv[:, 1, :, :end]

    def reset(self) -> None:
        self.length = 0


class AxialSelfAttention(nn.Module):
    """Self-attention along the rows or the columns of a [B, H, W, D] tensor.

    Row attention lets each pixel see its row; column attention its column. `causal=True` masks
    the future along that axis (lower-triangular, diagonal included: the decoders' shifts make the
    model strictly causal, paper section 4.2).
    """

    def __init__(self, dim: int, heads: int, axis: Axis, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if axis not in ("row", "column"):
            raise ValueError(f"axis must be 'row' or 'column', got {axis!r}")
        self.heads, self.axis, self.causal = heads, axis, causal
        self.head_dim = dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)  # fused: one matmul instead of three
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x: [B, H, W, D] -> [B, H, W, D].

        With a cache, the new positions along the attended axis are appended to it and attend to
        everything it holds. Once the cache holds anything, one position is decoded per call.
        """
        b = x.shape[0]
        qkv = self.project(x)
        if cache is None and uses_matmuls(qkv, x.shape[2 if self.axis == "row" else 1]):
            return self.to_out(FoldedAttention.apply(qkv, self.axis, self.causal))

        # Through SDPA or a cache: splitting q, k, v before folding lets the backward stack their
        # gradients straight into the projection's layout (folding the fused tensor costs a
        # concatenation plus a permuting copy).
        fold = "b h w n e -> (b h) n w e" if self.axis == "row" else "b h w n e -> (b w) n h e"
        q, k, v = (rearrange(t, fold) for t in qkv.unbind(3))

        causal = self.causal
        if cache is not None:
            if cache.length and q.shape[2] != 1:
                raise ValueError("a cached decoding step takes one new position along the axis")
            if cache.length:
                # is_causal=True aligns its mask to the top-left: one query against t cached keys
                # would see only key 0. The cache holds only the past and the present, so attending
                # to all of it is exactly causal (DESIGN.md section 3).
                causal = False
            k, v = cache.append(k, v)

        out = attend(q, k, v, causal, scale=1.0)
        if self.axis == "row":
            out = rearrange(out, "(b h) n w e -> b h w (n e)", b=b)
        else:
            out = rearrange(out, "(b w) n h e -> b h w (n e)", b=b)
        return self.to_out(out)

    def project(self, x: Tensor) -> Tensor:
        """[B, H, W, D] -> fused q, k, v [B, H, W, 3, heads, e], the queries already scaled by
        1/sqrt(e): scaling the [3D, D] weights costs nothing next to scaling every score, forward
        and backward."""
        return F.linear(x, *self.scaled_qkv()).unflatten(-1, (3, self.heads, self.head_dim))

    def scaled_qkv(self) -> tuple[Tensor, Tensor]:
        """The fused projection's (weight [3D, D], bias [3D]), query rows times 1/sqrt(e)."""
        scale, dim = self.head_dim**-0.5, self.to_out.in_features
        (w_q, w_kv), (b_q, b_kv) = (p.split([dim, 2 * dim]) for p in self.to_qkv.parameters())
        return torch.cat([w_q * scale, w_kv]), torch.cat([b_q * scale, b_kv])

    def new_cache(self, folded_batch: int, max_len: int, like: Tensor) -> KVCache:
        return KVCache(folded_batch, self.heads, max_len, self.head_dim, like)
