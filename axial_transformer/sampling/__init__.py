"""Drawing and completing images: the cached semi-parallel sampler and its naive reference
(sampler.py), and the checks and canvas of a request (request.py)."""

from .sampler import sample, sample_naive

__all__ = ["sample", "sample_naive"]
