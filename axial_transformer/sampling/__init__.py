"""Drawing and completing images: the cached semi-parallel sampler and its naive reference
(sampler.py), and the request that both draw, its checks, batches and canvas (request.py)."""

from .sampler import Request, draw, sample, sample_naive

__all__ = ["Request", "draw", "sample", "sample_naive"]
