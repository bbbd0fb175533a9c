"""Autoregressive image density models with the Axial Transformer (Ho et al. 2019)."""

from .config import PRESETS, AxialTransformerConfig
from .model import AxialTransformer

__all__ = ["PRESETS", "AxialTransformer", "AxialTransformerConfig"]
__version__ = "0.1.0"
