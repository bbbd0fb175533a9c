"""Lossless image compression with a trained model: the coder (coder.py), the coding distribution
in exact arithmetic (exact_model.py) and the .axc container (format.py)."""

from .coder import compress, decompress

__all__ = ["compress", "decompress"]
