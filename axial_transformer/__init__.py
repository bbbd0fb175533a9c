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
from .model.video import VideoTransformer, build_model

__all__ = [
    "PRESETS",
    "AxialAttention",
    "AxialAttentionBlock",
    "AxialPositionalEmbedding",
    "AxialTransformer",
    "AxialTransformerConfig",
    "AxisAttention",
    "ChannelAttention",
    "VideoTransformer",
    "build_model",
]
__version__ = "0.1.0"
