"""The model's coding distribution in exact arithmetic: the same numbers on every machine.

A float forward pass is not reproducible across machines: a matmul rounds its partial sums in
an order set by the CPU's vector width, the thread count, the batch size, the BLAS and the
device, and exp or sigmoid come from libraries that differ in their last bits. A range decoder
must see bit for bit the distribution the encoder saw, so the codec runs the model here in fixed
point, after the integer networks of Balle, Johnston and Minnen (2019, arXiv 1810.01365):

- weights, embeddings and activations are quantised to integers (an activation counts units of
  2^-16), held in float64;
- every reduction (a matmul, a sum) adds integers whose partial sums stay below 2^52, which
  float64 holds exactly: every order of summation gives the same result;
- every other operation is elementwise and ONE IEEE-754 basic operation (+, -, *, /, sqrt, a
  comparison, rounding to an integer), which the standard defines to the bit on every CPU and
  GPU; no fused multiply-add, no library exp;
- exp (softmax) and the GELU's sigmoid come from tables built with Python's decimal module, whose
  arithmetic is specified to the digit.

The bounds that keep each sum exact are derived from the layer sizes when the model is prepared
(`ExactAxialTransformer.__init__`); a value that would pass one is clamped, the same way on every
machine. `ARITHMETIC_VERSION` names this arithmetic: a change to any number here, or to the
order of operations, must raise it, since files written under one decode only under the same.

Axis letters: b batch, h rows, w columns, n heads, e features per head, t positions along the
attended axis, d features, v pixel values.
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

# exp(-u) for u = k / 2^EXP_FRACTION, k = 0 .. EXP_SIZE - 1, in units of 2^-EXP_ONE_BITS, then
# a 0 for everything further out (exp(-32) is 1.3e-14).
EXP_FRACTION = 10
EXP_SIZE = 32 << EXP_FRACTION
EXP_ONE_BITS = 30
ATTENTION_EXP_BITS = 16  # attention weights: the table rounded to 2^-16
# The GELU approximation z sigmoid(1.702 z) of the official axial/nn.py, tabulated over
# [-16, 16) in steps of 2^-EXP_FRACTION (at each step's midpoint); past 16 it is z itself to
# within 2^-30, and below -16 zero to within 2^-30.
GELU_RANGE = 16

# The range coder's probabilities: 24-bit, constriction's default (`Categorical`).
CODER_PRECISION = 24


def _decimal_powers(start: Decimal, ratio: Decimal, count: int, scale: int) -> list[int]:
    """round(start * ratio^k * scale) for k < count, in 40-digit decimal arithmetic (every step
    correctly rounded by the decimal module's specification, so the same list everywhere)."""
    context = Context(prec=40)
    value, out = start, []
    for _ in range(count):
        out.append(int(context.multiply(value, scale).to_integral_value()))
        value = context.multiply(value, ratio)
    return out


@functools.cache
def exp_table() -> tuple[int, ...]:
    """round(exp(-k / 2^10) * 2^30) for k < 32 * 2^10, then 0."""
    context = Context(prec=40)
    step = context.exp(Decimal(-1) / (1 << EXP_FRACTION))
    return (*_decimal_powers(Decimal(1), step, EXP_SIZE, 1 << EXP_ONE_BITS), 0)


@functools.cache
def gelu_table() -> tuple[int, ...]:
    """round(g(z) * 2^16) for g(z) = z sigmoid(1.702 z) at z = (k + 1/2) / 2^10, k from
    -16 * 2^10 to 16 * 2^10 - 1."""
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
    """ceil(log2 n) for n >= 1: the bits that count n values."""
    return (n - 1).bit_length()


def _quantise(t: Tensor, fraction_bits: int) -> Tensor:
    """round(t * 2^fraction_bits) in float64: exact (a power of two), then rounded half to even."""
    return torch.round(t.detach().double().cpu() * 2.0**fraction_bits)


def _fold_norm(weight: Tensor, bias: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """The layer that follows a layer norm, with the norm's gain and bias folded in, in float64:
    W diag(g) (products of two float32 numbers, exact) and b + W beta (math.fsum: the exactly
    rounded sum, the same on every machine)."""
    w = weight.detach().double().cpu()
    gain, shift = (p.detach().double().cpu() for p in (norm.weight, norm.bias))
    products = torch.cat([w * shift, bias.detach().double().cpu()[:, None]], dim=1)
    folded_bias = torch.tensor([math.fsum(row) for row in products.tolist()], dtype=torch.float64)
    return w * gain, folded_bias


class ExactLinear:
    """y = x W^T + b on integer activations: x counts units of 2^-in_fraction, is below
    2^in_bits, and y comes out rounded to units of 2^-16.

    The weights are integers W_int = round(W 2^f) scaled by a power of two, so that each product
    is a whole multiple of 2^(16 - in_fraction - f), and f is the largest that keeps every partial
    sum, bias included, below 2^52 of those units: K 2^in_bits 2^weight_bits <= 2^51, bias below
    2^51.
    """

    def __init__(self, weight: Tensor, bias: Tensor, in_fraction: int, in_bits: int) -> None:
        weight, bias = weight.detach().double().cpu(), bias.detach().double().cpu()
        out_fraction = ACTIVATION_BITS
        fan_in = weight.shape[1]
        weight_bits = min(WEIGHT_BITS, SUM_LIMIT_BITS - 1 - _bits(fan_in) - in_bits)
        if weight_bits < 8:
            raise ValueError(f"a layer of fan-in {fan_in} on inputs of {in_bits} bits leaves "
                             f"{weight_bits} bits for its weights in exact arithmetic")
        largest = weight.abs().max().item()
        exponent = math.frexp(largest)[1] if largest > 0 else 0  # |W| < 2^exponent
        bias_int = _quantise(bias, out_fraction)
        bias_bits = int(bias_int.abs().max().item()).bit_length()
        fraction = min(weight_bits - exponent,
                       SUM_LIMIT_BITS - 1 - bias_bits - in_fraction + out_fraction)
        self.unit = 2.0 ** (out_fraction - in_fraction - fraction)  # of the products
        self.weight = _quantise(weight, fraction) * self.unit  # [out, in], exact dyadic numbers
        self.bias = bias_int

    def __call__(self, x: Tensor) -> Tensor:
        return torch.round_(F.linear(x, self.weight, self.bias))

    def to(self, device: torch.device) -> ExactLinear:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self


class ExactNorm:
    """LayerNorm over d features without its gain and bias (folded into the next layer):
    x (units of 2^-16) -> (x - mean) / sqrt(var + eps) in units of 2^-16.

    c = d x - sum(x) is exact. The variance comes from s = round(c / 2^k), k the least shift
    that keeps sum(s^2) below 2^52; 1 / (d sqrt(var + eps)) is one multiply, one add, one sqrt
    and one division, each rounded once by IEEE 754; the output round(c * that) is bounded by
    `out_bits` (sqrt(d) 2^16, plus what the rounding of s can add).
    """

    def __init__(self, dim: int, eps: float) -> None:
        largest_c = 2 * dim * int(RESIDUAL_LIMIT)
        self.shift = next(k for k in range(64)
                          if dim * ((largest_c >> k) + 1) ** 2 < 2**SUM_LIMIT_BITS)
        self.dim, self.eps = dim, eps
        # var = sum(s^2) 2^(2k) / (d^3 2^32): s counts units of 2^k / (d 2^16).
        self.variance_scale = 2.0 ** (2 * self.shift - 2 * ACTIVATION_BITS) / dim**3
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


def exact_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                    exp: Tensor) -> Tensor:
    """softmax(q k^T + bias) v over [N, n, t, e], q scaled by 1/sqrt(e): the scores are exact
    (integers below 2^52), exp comes from the table, and each output is the weighted mean
    rounded to a whole unit, at most the largest |v|."""
    scores = q @ k.mT  # units of 2^-32
    if bias is not None:
        scores += bias  # 0 or -inf: exact
    distance = torch.sub(scores.amax(-1, keepdim=True), scores)  # >= 0, exact
    index = (distance * 2.0 ** (EXP_FRACTION - 2 * ACTIVATION_BITS)).clamp_(max=EXP_SIZE).long()
    weights = exp[index]  # integers <= 2^16, 0 for the masked keys
    return torch.round_((weights @ v) / weights.sum(-1, keepdim=True))


class ExactBlock:
    """An `AxialBlock` in exact arithmetic: x + attn(LN(x)), then + mlp(LN(x))."""

    def __init__(self, block: AxialBlock, tables: ExactTables, longest_axis: int) -> None:
        attn, (inner, _, outer) = block.attn, block.mlp
        dim = attn.to_out.in_features
        self.axis, self.heads = attn.axis, attn.heads
        self.attn_norm = ExactNorm(dim, block.attn_norm.eps)
        self.mlp_norm = ExactNorm(dim, block.mlp_norm.eps)
        w_qkv, b_qkv = _fold_norm(attn.to_qkv.weight, attn.to_qkv.bias, block.attn_norm)
        scale = 1 / math.sqrt(attn.head_dim)  # 1/sqrt(e) folded into the queries
        w_qkv[:dim] *= scale
        b_qkv[:dim] *= scale
        self.to_qkv = ExactLinear(w_qkv, b_qkv, ACTIVATION_BITS, self.attn_norm.out_bits)
        # q, k and v are clamped so that q k^T (e terms) and the weighted sum of v (t terms,
        # weights below 2^16) stay exact.
        qkv_bits = min((SUM_LIMIT_BITS - _bits(attn.head_dim)) // 2,
                       SUM_LIMIT_BITS - ATTENTION_EXP_BITS - 1 - _bits(longest_axis))
        self.qkv_limit = 2.0**qkv_bits
        self.to_out = ExactLinear(attn.to_out.weight, attn.to_out.bias, ACTIVATION_BITS,
                                  qkv_bits)
        w_in, b_in = _fold_norm(inner.weight, inner.bias, block.mlp_norm)
        self.mlp_in = ExactLinear(w_in, b_in, ACTIVATION_BITS, self.mlp_norm.out_bits)
        # The hidden units are clamped to +-1024 like the residual stream.
        self.mlp_out = ExactLinear(outer.weight, outer.bias, ACTIVATION_BITS,
                                   int(RESIDUAL_LIMIT).bit_length())
        self.tables = tables

    def __call__(self, x: Tensor, cache: Tensor | None = None,
                 position: Position | None = None) -> Tensor:
        """x [B, H, W, D] -> [B, H, W, D]; with a cache, one decoding step at `position` along
        the block's axis (as `AxialSelfAttention.forward`)."""
        x = x + self.attention(self.attn_norm(x), cache, position)
        return x + self.mlp(self.mlp_norm(x))

    def attention(self, x: Tensor, cache: Tensor | None, position: Position | None) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.to_qkv(x).clamp_(-self.qkv_limit, self.qkv_limit)
        exp = self.tables.attention_exp
        if cache is None:
            fold = ("b h w (i n e) -> i (b h) n w e" if self.axis == "row"
                    else "b h w (i n e) -> i (b w) n h e")
            q, k, v = rearrange(qkv, fold, i=3, n=self.heads)
            out = exact_attention(q, k, v, None, exp)
            unfold = ("(b h) n w e -> b h w (n e)" if self.axis == "row"
                      else "(b w) n h e -> b h w (n e)")
            return self.to_out(rearrange(out, unfold, b=b))
        n = b * h * w  # the step's one position along the axis: folding is a view
        qkv = qkv.view(n, 3, self.heads, 1, -1).transpose(0, 1)  # [3, N, n, 1, e]
        cache.index_copy_(3, position.index, qkv.narrow(0, 1, 2))
        keys, values = cache.unbind(0)
        out = exact_attention(qkv[0], keys, values, position.bias, exp)
        return self.to_out(out.view(b, h, w, -1))

    def mlp(self, x: Tensor) -> Tensor:
        z = self.mlp_in(x).clamp_(-RESIDUAL_LIMIT, RESIDUAL_LIMIT)
        return self.mlp_out(self.tables.gelu(z))

    def to(self, device: torch.device) -> ExactBlock:
        for layer in (self.to_qkv, self.to_out, self.mlp_in, self.mlp_out):
            layer.to(device)
        return self


class ExactTables:
    """The exp and GELU tables on one device."""

    def __init__(self, device: torch.device) -> None:
        self.exp = torch.tensor(exp_table(), dtype=torch.int64, device=device)
        shift = EXP_ONE_BITS - ATTENTION_EXP_BITS
        self.attention_exp = ((self.exp + (1 << (shift - 1))) >> shift).double()
        self.gelu_values = torch.tensor(gelu_table(), dtype=torch.float64, device=device)

    def gelu(self, z: Tensor) -> Tensor:
        """z sigmoid(1.702 z) of z in units of 2^-16: the table's value at z's step of 2^-10,
        z itself from 16 on."""
        half = GELU_RANGE << EXP_FRACTION
        index = torch.floor_(z * 2.0 ** (EXP_FRACTION - ACTIVATION_BITS)).add_(half)
        g = self.gelu_values[index.clamp_(0, 2 * half - 1).long()]
        return torch.where(z >= float(GELU_RANGE << ACTIVATION_BITS), z, g)


def frequencies(logits: Tensor, exp: Tensor) -> Tensor:
    """The range coder's integer distribution of each subpixel from its exact logits [B, V]
    (units of 2^-16): n_v = floor(exp(l_v - max) 2^30 F / sum), F = 2^24 - V, the remainder to
    value 0, all in int64 -> [B, V] int64 summing to F. The coder gives each value n_v + 1 of
    2^24 (every value stays codable)."""
    free = (1 << CODER_PRECISION) - logits.shape[-1]
    distance = torch.sub(logits.amax(-1, keepdim=True), logits)
    index = (distance * 2.0 ** (EXP_FRACTION - ACTIVATION_BITS)).clamp_(max=EXP_SIZE).long()
    weights = exp[index]  # <= 2^30: times F stays below 2^54
    counts = torch.div(weights * free, weights.sum(-1, keepdim=True), rounding_mode="floor")
    counts[:, 0] += free - counts.sum(-1)
    return counts


class ExactAxialTransformer:
    """An `AxialTransformer`'s decoding steps (channel context, outer-decoder row, inner-decoder
    subpixel) in exact arithmetic, on the model's device. Logits come out in units of 2^-16."""

    def __init__(self, model: AxialTransformer) -> None:
        c = self.config = model.config
        device = next(model.parameters()).device
        self.device = device
        self.tables = ExactTables(device)
        longest = max(c.image_size)

        def blocks(stack: nn.Module) -> list[ExactBlock]:
            return [ExactBlock(b, self.tables, longest).to(device) for b in stack.blocks]

        def embedding(t: Tensor) -> Tensor:
            return _quantise(t, ACTIVATION_BITS).to(device)

        self.pixel_embedding = embedding(model.pixel_embedding.weight)  # [levels, D]
        self.pos_h, self.pos_w = embedding(model.pos_h), embedding(model.pos_w)
        self.encoder_pos = embedding(model.encoder_pos_h) + embedding(model.encoder_pos_w)
        self.class_embedding = (None if model.class_embedding is None
                                else embedding(model.class_embedding.weight))
        # The 3x3 convolution of the channel encoder takes pixel values x / (levels - 1): here
        # the integer values, with the 1/(levels - 1) in its weights.
        conv = model.encoder_input
        self.encoder_input = ExactLinear(conv.weight.detach().double().flatten(1)
                                         / (c.levels - 1), conv.bias, 0,
                                         _bits(c.levels)).to(device)
        self.channel_encoder = blocks(model.channel_encoder)
        self.outer_decoder = blocks(model.outer_decoder)
        self.inner_decoder = blocks(model.inner_decoder)
        self.final_norm = ExactNorm(c.dim, model.final_norm.eps)
        self.to_logits = ExactLinear(*_fold_norm(model.to_logits.weight, model.to_logits.bias,
                                                 model.final_norm), ACTIVATION_BITS,
                                     self.final_norm.out_bits).to(device)
        self.rows = decoding_positions(c.image_size[0], self.pos_h)
        self.columns = decoding_positions(c.image_size[1], self.pos_h)

    def positions(self) -> Tensor:
        return self.pos_h + self.pos_w  # (H, W, D)

    def channel_context(self, x: Tensor, channel: int, labels: Tensor | None) -> Tensor:
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
        """Zeroed key/value caches of the outer decoder (over rows, per column of each image)
        and of the inner decoder (over the columns of the row being decoded)."""
        (h, w), dim, heads = self.config.image_size, self.config.dim, self.config.heads

        def caches(blocks: list[ExactBlock], folded: int, length: int) -> list:
            shape = (2, folded, heads, length, dim // heads)
            return [torch.zeros(shape, dtype=torch.float64, device=self.device)
                    if block.axis == "column" or blocks is self.inner_decoder else None
                    for block in blocks]

        return caches(self.outer_decoder, batch * w, h), caches(self.inner_decoder, batch, w)

    def outer_step(self, inputs: Tensor, caches: list, row: int) -> Tensor:
        """Row `row`'s outer-decoder inputs [B, W, D] -> its output [B, W, D] (for row + 1)."""
        x = inputs[:, None]
        for block, cache in zip(self.outer_decoder, caches, strict=True):
            x = block(x, cache, self.rows[row] if cache is not None else None)
        return x[:, 0]

    def inner_step(self, inputs: Tensor, caches: list, column: int) -> Tensor:
        """Subpixel `column`'s inner-decoder input [B, D] -> its logits [B, V]."""
        x = inputs[:, None, None]
        for block, cache in zip(self.inner_decoder, caches, strict=True):
            x = block(x, cache, self.columns[column])
        return self.to_logits(self.final_norm(x[:, 0, 0]))
