"""Exponential moving average of the weights, the model that is evaluated and sampled.

The paper evaluates an EMA with decay 0.99995 (official config_imagenet32.py). Over a short run
that EMA would still be almost the random init, so the decay warms up as
`min(decay, (1 + t) / (10 + t))` after t updates: it starts at 0.1 (mostly the live weights) and
reaches the nominal decay after about 2/(1 - decay) steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    """The decay of the update after `step` earlier updates."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Holds `model`'s averaged copy in `self.model` (eval mode, no gradients, fp32)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend in `model`'s current weights; `step` counts the updates made before this one."""
        d = ema_decay_at(step, self.decay)
        for e, v in zip(self.model.state_dict().values(), model.state_dict().values(),
                        strict=True):
            if e.is_floating_point():
                e.lerp_(v.detach().to(e.dtype), 1.0 - d)
