"""Lossless image compression with a trained model: the coder, the coding distribution in exact
arithmetic and the .axc container (docs/codec.md)."""

from .coder import compress, decompress

__all__ = ["compress", "decompress"]
