"""Autoregressive image density models with the Axial Transformer (Ho et al. 2019)."""

from .layers import (
    AxialAttention,
    AxialAttentionBlock,
    AxialPositionalEmbedding,
    AxisAttention,
    ChannelAttention,
)
from .model.config import PRESETS, AxialTransformerConfig
from .model.transformer import AxialTransformer

__all__ = [
    "PRESETS",
    "AxialAttention",
    "AxialAttentionBlock",
    "AxialPositionalEmbedding",
    "AxialTransformer",
    "AxialTransformerConfig",
    "AxisAttention",
    "ChannelAttention",
]
__version__ = "0.1.0"
