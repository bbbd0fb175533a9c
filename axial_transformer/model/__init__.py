"""The Axial Transformer: its configuration (config.py), attention along one axis (attention.py),
the blocks (blocks.py), the channel encoder and the outer and inner decoders (transformer.py),
the sampler's loop of cached decoding steps (decoding.py), and the video model (video.py)."""

from .config import PRESETS, AxialTransformerConfig
from .transformer import AxialTransformer
from .video import VideoTransformer, build_model

__all__ = ["PRESETS", "AxialTransformer", "AxialTransformerConfig", "VideoTransformer",
           "build_model"]
