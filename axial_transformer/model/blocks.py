"""The transformer blocks of the Axial Transformer: a pre-LN block whose attention runs along one
axis (official axial/nn.py), and a stack of them. A block's forward is also its decoding step:
given a key/value cache and a position, it decodes one new position along its axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import AxialSelfAttention, Axis, Position

GELU_SCALE = 1.702


def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """`norm(x)` without a module call, which costs more than a decoding step's layer norm."""
    return torch.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class MLP(nn.Sequential):
    """Linear -> z sigmoid(1.702 z) -> Linear, the GELU approximation of the official
    axial/nn.py. With many tokens (training, evaluation) it runs as Linear -> SiLU -> Linear with
    the constant moved into the weights, z sigmoid(1.702 z) = silu(1.702 z) / 1.702: SiLU is one
    fused kernel where the product takes three passes over the hidden activations, and scaling
    the weights costs next to nothing. A decoding step holds a few tokens, fewer values than the
    weights: there the product is cheaper."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        inner, silu, outer = self
        if x.numel() >= inner.weight.numel():
            h = silu(F.linear(x, inner.weight * GELU_SCALE, inner.bias * GELU_SCALE))
            return F.linear(h, outer.weight / GELU_SCALE, outer.bias)
        z = F.linear(x, inner.weight, inner.bias)
        return F.linear(z * torch.sigmoid(GELU_SCALE * z), outer.weight, outer.bias)


class AxialBlock(nn.Module):
    """Pre-LN transformer block (official axial/nn.py):
        x = x + drop(attn(attn_norm(x)))
        x = x + drop(mlp(mlp_norm(x)))
    In the model `attn` runs along one axis; the CNN layers' `AxialAttentionBlock` (layers.py)
    is this block with attention along every axis of a feature map."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = attn
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, max(1, round(dim * mlp_ratio)))
        self.dropout = dropout

    def forward(
        self, x: Tensor, cache: Tensor | None = None, position: Position | None = None
    ) -> Tensor:
        """x [B, H, W, D] -> [B, H, W, D]; with a key/value `cache`, one decoding step at
        `position` (see `AxialSelfAttention.forward`)."""
        x = self.attention(x, cache, position)
        # A decoding step: at batch 1, nn.Module's call machinery costs more than the
        # sublayers' arithmetic.
        mlp = self.mlp if cache is None else self.mlp.forward
        return x + self.residual(mlp(layer_norm(x, self.mlp_norm)))

    def attention(
        self, x: Tensor, cache: Tensor | None = None, position: Position | None = None
    ) -> Tensor:
        """x plus the attention branch (the step before the MLP)."""
        h = layer_norm(x, self.attn_norm)
        return x + self.residual(self.attn(h) if cache is None
                                 else self.attn.forward(h, cache, position))

    def residual(self, branch: Tensor) -> Tensor:
        """Dropout on a residual branch in training (the paper's); nothing to call otherwise."""
        if self.training and self.dropout > 0:
            return F.dropout(branch, self.dropout)
        return branch


class AxialStack(nn.Module):
    """A sequence of axial blocks; `axes` gives each block's (axis, causal)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        axes: list[tuple[Axis, bool]],
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            AxialBlock(dim, AxialSelfAttention(dim, heads, axis, causal), mlp_ratio, dropout)
            for axis, causal in axes
        )
        self.gradient_checkpointing = False  # AxialTransformer.set_gradient_checkpointing

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def step(self, x: Tensor, caches: list[Tensor | None], position: Position) -> Tensor:
        """Decode one position along the masked blocks' axis: x [B, H, W, D] holds it (length 1
        along that axis) and passes through every block; each masked block writes its keys and
        values into its cache, and the unmasked ones (cache None) see their whole axis in x."""
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.forward(x, cache, position)  # not block(...): see AxialBlock.forward
        return x

    def new_caches(self, folded_batch: int, length: int, like: Tensor) -> list[Tensor | None]:
        """One key/value cache per masked block, for `length` positions of a folded batch."""
        return [
            b.attn.new_cache(folded_batch, length, like) if b.attn.causal else None
            for b in self.blocks
        ]
