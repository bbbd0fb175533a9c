"""The Axial Transformer: its configuration (config.py), attention along one axis (attention.py),
the blocks (blocks.py), the channel encoder and the outer and inner decoders (transformer.py),
and the sampler's loop of cached decoding steps (decoding.py)."""

from .config import PRESETS, AxialTransformerConfig
from .transformer import AxialTransformer

__all__ = ["PRESETS", "AxialTransformer", "AxialTransformerConfig"]
