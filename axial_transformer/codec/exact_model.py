"""The model's coding distribution in exact arithmetic, after Balle, Johnston and Minnen (2019,
arXiv 1810.01365): the same numbers on every machine, thread count and batch (docs/codec.md).

Activations are integer counts of 2^-16 in float64; every reduction adds integers whose partial
sums stay below 2^52 (exact in any order); every other operation is ONE elementwise IEEE-754
basic operation (defined to the bit); exp and the GELU come from tables built with Python's
decimal module. Changing a number or the order of operations must raise `ARITHMETIC_VERSION`.
"""

from __future__ import annotations

import functools
import math
from decimal import Context, Decimal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..model.attention import Position, decoding_positions
from ..model.blocks import GELU_SCALE, AxialBlock
from ..model.transformer import AxialTransformer

__all__ = ["ARITHMETIC_VERSION", "ExactAxialTransformer", "frequencies"]

ARITHMETIC_VERSION = 1

ACTIVATION_BITS = 16  # an activation is an integer count of 2^-16
RESIDUAL_LIMIT = 2.0 ** (ACTIVATION_BITS + 10)  # a layer norm's input is clamped to +-1024
WEIGHT_BITS = 24  # at most this many bits per weight: 7 significant digits, as float32
SUM_LIMIT_BITS = 52  # every reduction stays below 2^52 (float64 holds integers up to 2^53)

# exp(-u) for u = k / 2^EXP_FRACTION, k < EXP_SIZE, in units of 2^-EXP_ONE_BITS, then 0 (exp(-32)
# is 1.3e-14). Attention rounds it to 2^-ATTENTION_EXP_BITS.
EXP_FRACTION, EXP_SIZE, EXP_ONE_BITS, ATTENTION_EXP_BITS = 10, 32 << 10, 30, 16
# The official axial/nn.py's GELU z sigmoid(1.702 z), tabulated over [-16, 16) at the midpoints
# of steps of 2^-EXP_FRACTION; past 16 it is z, below -16 zero, each to within 2^-30.
GELU_RANGE = 16
CODER_PRECISION = 24  # the range coder's probabilities: constriction's default (`Categorical`)


def _decimal_powers(start: Decimal, ratio: Decimal, count: int, scale: int) -> list[int]:
    """round(start * ratio^k * scale) for k < count, each step correctly rounded to 40 digits."""
    context = Context(prec=40)
    value, out = start, []
    for _ in range(count):
        out.append(int(context.multiply(value, scale).to_integral_value()))
        value = context.multiply(value, ratio)
    return out


@functools.cache
def exp_table() -> tuple[int, ...]:
    step = Context(prec=40).exp(Decimal(-1) / (1 << EXP_FRACTION))
    return (*_decimal_powers(Decimal(1), step, EXP_SIZE, 1 << EXP_ONE_BITS), 0)


@functools.cache
def gelu_table() -> tuple[int, ...]:
    """round(z sigmoid(1.702 z) 2^16) at z = (k + 1/2) / 2^10 for k in [-16 2^10, 16 2^10)."""
    context = Context(prec=40)
    half = GELU_RANGE << EXP_FRACTION
    scale = context.multiply(Decimal(str(GELU_SCALE)), Decimal(1) / (1 << EXP_FRACTION))
    # exp(-1.702 z) from the first midpoint on, one step at a time.
    first = context.exp(context.multiply(scale, Decimal(half) - Decimal("0.5")))
    decays = _decimal_powers(first, context.exp(-scale), 2 * half, 1 << 60)
    table = []
    for k, decay in zip(range(-half, half), decays, strict=True):
        z = Decimal(2 * k + 1) / (2 << EXP_FRACTION)
        g = context.divide(context.multiply(z, 1 << (ACTIVATION_BITS + 60)), (1 << 60) + decay)
        table.append(int(g.to_integral_value()))
    return tuple(table)


def _bits(n: int) -> int:
    return (n - 1).bit_length()  # ceil(log2 n): the bits that count n values


def _quantise(t: Tensor, fraction_bits: int) -> Tensor:
    return torch.round(t.detach().double() * 2.0**fraction_bits)  # exact, then half to even


def _fold_norm(linear: nn.Linear, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """The layer after a layer norm with the norm's gain and bias folded in: W diag(g) (a product
    of two float32 numbers, exact in float64) and b + W beta (math.fsum: rounded once)."""
    w, bias, gain, shift = (p.detach().double()
                            for p in (linear.weight, linear.bias, norm.weight, norm.bias))
    products = torch.cat([w * shift, bias[:, None]], dim=1).tolist()
    return w * gain, w.new_tensor([math.fsum(row) for row in products])


class ExactLinear:
    """y = round(x W^T + b) for x in units of 2^-in_fraction below 2^in_bits, y in units of 2^-16.

    W becomes round(W 2^f) times a power of two, with f the largest that keeps every partial sum,
    bias included, below 2^52 units of the products: K 2^in_bits 2^weight_bits <= 2^51."""

    def __init__(self, weight: Tensor, bias: Tensor, in_bits: int,
                 in_fraction: int = ACTIVATION_BITS) -> None:
        weight, fan_in = weight.detach().double(), weight.shape[1]
        weight_bits = min(WEIGHT_BITS, SUM_LIMIT_BITS - 1 - _bits(fan_in) - in_bits)
        if weight_bits < 8:
            raise ValueError(f"a layer of fan-in {fan_in} on inputs of {in_bits} bits leaves "
                             f"{weight_bits} bits for its weights in exact arithmetic")
        exponent = math.frexp(weight.abs().max().item())[1]  # |W| < 2^exponent
        bias = _quantise(bias, ACTIVATION_BITS)
        bias_bits = int(bias.abs().max().item()).bit_length()
        fraction = min(weight_bits - exponent,
                       SUM_LIMIT_BITS - 1 - bias_bits - in_fraction + ACTIVATION_BITS)
        self.unit = 2.0 ** (ACTIVATION_BITS - in_fraction - fraction)  # of the products
        self.weight = _quantise(weight, fraction) * self.unit  # exact dyadic numbers
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        return torch.round_(F.linear(x, self.weight, self.bias))


class ExactNorm:
    """LayerNorm without gain and bias (folded into the next layer), in units of 2^-16: c = d x -
    sum(x) is exact, the variance sums s^2 for s = round(c / 2^k) below 2^52, and 1 / (d sqrt(var
    + eps)) is four operations each rounded once (no rsqrt: CUDA's is approximate)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        (dim,), eps = norm.normalized_shape, norm.eps
        largest_c = 2 * dim * int(RESIDUAL_LIMIT)
        self.shift = next(k for k in range(64)
                          if dim * ((largest_c >> k) + 1) ** 2 < 2**SUM_LIMIT_BITS)
        self.dim, self.eps = dim, eps
        # var = sum(s^2) 2^(2k) / (d^3 2^32): s counts units of 2^k / (d 2^16).
        self.variance_scale = 2.0 ** (2 * self.shift - 2 * ACTIVATION_BITS) / dim**3
        # The output is below sqrt(d) 2^16, plus what the rounding of s can add.
        bound = math.sqrt(dim) * 2**ACTIVATION_BITS + 2 ** (self.shift - 1) / math.sqrt(dim * eps)
        self.out_bits = int(bound + 1).bit_length()

    def __call__(self, x: Tensor) -> Tensor:
        x = x.clamp(-RESIDUAL_LIMIT, RESIDUAL_LIMIT)
        c = torch.sub(x * self.dim, x.sum(-1, keepdim=True))
        s = torch.round_(c * 2.0**-self.shift)
        variance = (s * s).sum(-1, keepdim=True)
        inverse = torch.reciprocal_(torch.sqrt_(variance * self.variance_scale + self.eps)
                                    * self.dim)
        return torch.round_(c * inverse)


def exp_weights(x: Tensor, exp: Tensor, fraction_bits: int) -> Tensor:
    """exp(x - max x) along the last axis from the table, x in units of 2^-fraction_bits: the
    index is an exact difference times a power of two, floored (-inf gives the table's 0)."""
    distance = torch.sub(x.amax(-1, keepdim=True), x)  # >= 0, exact
    return exp[(distance * 2.0 ** (EXP_FRACTION - fraction_bits)).clamp_(max=EXP_SIZE).long()]


def exact_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                    exp: Tensor) -> Tensor:
    """softmax(q k^T + bias) v over [N, n, t, e] (q already scaled by 1/sqrt(e)): the scores are
    exact, exp comes from the table, each output is the weighted mean rounded to a whole unit."""
    scores = q @ k.mT  # units of 2^-32
    if bias is not None:
        scores += bias  # 0 or -inf: exact
    weights = exp_weights(scores, exp, 2 * ACTIVATION_BITS)  # integers <= 2^16
    return torch.round_((weights @ v) / weights.sum(-1, keepdim=True))


class ExactBlock:
    """An `AxialBlock` in exact arithmetic: x + attn(LN(x)), then + mlp(LN(x))."""

    def __init__(self, block: AxialBlock, exact: ExactAxialTransformer) -> None:
        attn, (inner, _, outer) = block.attn, block.mlp
        dim, longest = attn.to_out.in_features, max(exact.config.image_size)
        self.axis, self.heads, self.exact = attn.axis, attn.heads, exact
        self.attn_norm, self.mlp_norm = ExactNorm(block.attn_norm), ExactNorm(block.mlp_norm)
        w_qkv, b_qkv = _fold_norm(attn.to_qkv, block.attn_norm)
        scale = 1 / math.sqrt(attn.head_dim)  # 1/sqrt(e) folded into the queries
        for t in (w_qkv, b_qkv):
            t[:dim] *= scale
        self.to_qkv = ExactLinear(w_qkv, b_qkv, self.attn_norm.out_bits)
        # q, k and v are clamped so that q k^T (e terms) and the weighted sum of v (t terms,
        # weights below 2^16) stay exact.
        qkv_bits = min((SUM_LIMIT_BITS - _bits(attn.head_dim)) // 2,
                       SUM_LIMIT_BITS - ATTENTION_EXP_BITS - 1 - _bits(longest))
        self.qkv_limit = 2.0**qkv_bits
        self.to_out = ExactLinear(attn.to_out.weight, attn.to_out.bias, qkv_bits)
        self.mlp_in = ExactLinear(*_fold_norm(inner, block.mlp_norm), self.mlp_norm.out_bits)
        # The hidden units are clamped to +-1024 like the residual stream.
        self.mlp_out = ExactLinear(outer.weight, outer.bias, int(RESIDUAL_LIMIT).bit_length())

    def __call__(self, x: Tensor, cache: Tensor | None = None,
                 position: Position | None = None) -> Tensor:
        """x [B, H, W, D]; with a cache, one decoding step at `position` along the block's axis."""
        x = x + self.attention(self.attn_norm(x), cache, position)
        z = self.mlp_in(self.mlp_norm(x)).clamp_(-RESIDUAL_LIMIT, RESIDUAL_LIMIT)
        half = GELU_RANGE << EXP_FRACTION  # the GELU from its table, z itself from 16 on
        index = torch.floor_(z * 2.0 ** (EXP_FRACTION - ACTIVATION_BITS)).add_(half)
        g = self.exact.gelu_table[index.clamp_(0, 2 * half - 1).long()]
        return x + self.mlp_out(torch.where(z >= float(GELU_RANGE << ACTIVATION_BITS), z, g))

    def attention(self, x: Tensor, cache: Tensor | None, position: Position | None) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.to_qkv(x).clamp_(-self.qkv_limit, self.qkv_limit)
        if cache is None:
            folded = "(b h) n w e" if self.axis == "row" else "(b w) n h e"
            q, k, v = rearrange(qkv, f"b h w (i n e) -> i {folded}", i=3, n=self.heads)
            out = exact_attention(q, k, v, None, self.exact.attention_exp)
            return self.to_out(rearrange(out, f"{folded} -> b h w (n e)", b=b, h=h, w=w))
        n = b * h * w  # the step's one position along the axis: folding is a view
        qkv = qkv.view(n, 3, self.heads, 1, -1).transpose(0, 1)  # [3, N, n, 1, e]
        cache.index_copy_(3, position.index, qkv.narrow(0, 1, 2))
        keys, values = cache.unbind(0)
        out = exact_attention(qkv[0], keys, values, position.bias, self.exact.attention_exp)
        return self.to_out(out.view(b, h, w, -1))


def frequencies(logits: Tensor, exp: Tensor) -> Tensor:
    """The range coder's integer distribution [B, V] int64 of exact logits [B, V] (units of 2^-16):
    n_v = floor(exp(l_v - max) 2^30 F / sum) for F = 2^24 - V, the remainder to value 0. The coder
    gives each value n_v + 1 of 2^24, so every value stays codable."""
    free = (1 << CODER_PRECISION) - logits.shape[-1]
    weights = exp_weights(logits, exp, ACTIVATION_BITS)  # <= 2^30: times F stays below 2^54
    counts = torch.div(weights * free, weights.sum(-1, keepdim=True), rounding_mode="floor")
    counts[:, 0] += free - counts.sum(-1)
    return counts


class ExactAxialTransformer:
    """An `AxialTransformer`'s decoding steps (channel context, outer-decoder row, inner-decoder
    subpixel) in exact arithmetic, on the model's device. Logits come in units of 2^-16."""

    def __init__(self, model: AxialTransformer) -> None:
        c = self.config = model.config
        device = self.device = next(model.parameters()).device
        self.exp = torch.tensor(exp_table(), dtype=torch.int64, device=device)
        shift = EXP_ONE_BITS - ATTENTION_EXP_BITS
        self.attention_exp = ((self.exp + (1 << (shift - 1))) >> shift).double()
        self.gelu_table = torch.tensor(gelu_table(), dtype=torch.float64, device=device)
        embedding = functools.partial(_quantise, fraction_bits=ACTIVATION_BITS)
        self.pixel_embedding = embedding(model.pixel_embedding.weight)  # [levels, D]
        self.positions = embedding(model.pos_h) + embedding(model.pos_w)  # [H, W, D]
        self.encoder_pos = embedding(model.encoder_pos_h) + embedding(model.encoder_pos_w)
        self.class_embedding = (None if model.class_embedding is None
                                else embedding(model.class_embedding.weight))
        # The channel encoder's 3x3 convolution takes pixel values x / (levels - 1): here the
        # integer values, with the 1/(levels - 1) in its weights.
        w = model.encoder_input.weight.detach().double().flatten(1) / (c.levels - 1)
        self.encoder_input = ExactLinear(w, model.encoder_input.bias, _bits(c.levels), 0)
        self.channel_encoder, self.outer_decoder, self.inner_decoder = (
            [ExactBlock(b, self) for b in stack.blocks]
            for stack in (model.channel_encoder, model.outer_decoder, model.inner_decoder))
        self.final_norm = ExactNorm(model.final_norm)
        self.to_logits = ExactLinear(*_fold_norm(model.to_logits, model.final_norm),
                                     self.final_norm.out_bits)
        self.rows = decoding_positions(c.image_size[0], self.positions)
        self.columns = decoding_positions(c.image_size[1], self.positions)

    def channel_context(self, x: Tensor, channel: int, labels: Tensor) -> Tensor:
        """ctx [B, H, W, D] for modelling channel `channel` of images x [B, C, H, W] (long)."""
        b, c, h, w = x.shape
        planes = torch.zeros((b, 2 * c, h, w), dtype=torch.float64, device=x.device)
        planes[:, :channel] = x[:, :channel]  # the known channels' values
        planes[:, c + channel] = self.config.levels - 1  # one-hot, times levels - 1
        patches = F.unfold(planes, kernel_size=3, padding=1)  # [B, 2C*9, H*W]: a copy, exact
        ctx = self.encoder_input(patches.mT).view(b, h, w, -1) + self.encoder_pos
        if self.class_embedding is not None:
            ctx = ctx + self.class_embedding[labels % (self.config.num_classes + 1)][:, None, None]
        for block in self.channel_encoder:
            ctx = block(ctx)
        return ctx

    def new_caches(self, batch: int) -> tuple[list, list]:
        """Zeroed key/value caches of the outer decoder's column blocks (over rows, per column of
        each image) and of every inner-decoder block (over the columns of the row)."""
        (h, w), heads = self.config.image_size, self.config.heads

        def cache(folded: int, length: int) -> Tensor:
            return torch.zeros((2, folded, heads, length, self.config.dim // heads),
                               dtype=torch.float64, device=self.device)

        return ([cache(batch * w, h) if b.axis == "column" else None for b in self.outer_decoder],
                [cache(batch, w) for _ in self.inner_decoder])

    def outer_step(self, inputs: Tensor, caches: list, row: int) -> Tensor:
        """Row `row`'s outer-decoder inputs [B, W, D] -> its output [B, W, D] (for row + 1)."""
        x = inputs[:, None]
        for block, cache in zip(self.outer_decoder, caches, strict=True):
            x = block(x, cache, self.rows[row] if cache is not None else None)  # row blocks: all
        return x[:, 0]

    def inner_step(self, inputs: Tensor, caches: list, column: int) -> Tensor:
        """Subpixel `column`'s inner-decoder input [B, D] -> its logits [B, V]."""
        x = inputs[:, None, None]
        for block, cache in zip(self.inner_decoder, caches, strict=True):
            x = block(x, cache, self.columns[column])
        return self.to_logits(self.final_norm(x[:, 0, 0]))
