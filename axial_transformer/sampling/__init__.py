"""Drawing and completing images: the cached semi-parallel sampler and its naive reference
(sampler.py), and the request that both draw, its checks, batches and canvas (request.py);
the video model's samplers and its known first frames (video.py)."""

from .sampler import Request, draw, sample, sample_naive
from .video import given_frames

__all__ = ["Request", "draw", "given_frames", "sample", "sample_naive"]
