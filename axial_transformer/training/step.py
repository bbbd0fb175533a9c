"""One optimizer step: its learning rate, its data, its random channels and dropout, gradient
accumulation, and the skip of a step whose loss or gradient is not finite.

Everything a step draws is a pure function of the step (and the seed): the learning rate, the
data position, the channel scored for each image and the dropout masks. That is what makes a
resumed run take, bit for bit, the steps it would have taken without the interruption.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.splits import split_batch
from ..model.transformer import AxialTransformer
from .config import OptimConfig
from .distributed import agree


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up from 0, then constant
    (the paper) or a cosine decay to `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class Objective(nn.Module):
    """The training loss as a module's forward, so that DDP (which only hooks `forward`)
    synchronises its gradients and torch.compile sees the whole computation."""

    def __init__(self, model: AxialTransformer, objective: str) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: Tensor, channel: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.model.loss(x, self.objective, channel=channel, labels=labels)


def position_seed(seed: int, micro_batch: int, rank: int) -> int:
    """The seed of one micro-batch on one process, for its channels and dropout masks: a resumed
    run draws the same ones, whatever else consumed random numbers in between (a DataLoader
    draws a seed from the global generator each time an iterator starts)."""
    return int(np.random.SeedSequence([seed, micro_batch, rank]).generate_state(1)[0])


def training_batches(loader: DataLoader, accelerator, position: int) -> Iterator[Tensor]:
    """Micro-batches forever, starting `position` micro-batches into the run. The prepared loader
    shuffles with a seedable sampler (seed + epoch), so epoch e has the same order in every run;
    a resume skips the batches of its epoch that were already used."""
    epoch, skip = divmod(position, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


class StepResult(NamedTuple):
    loss: Tensor  # mean loss of the step's micro-batches on this process
    grad_norm: Tensor  # global gradient norm before clipping
    skipped: bool  # the loss or gradient was not finite on some process: no update anywhere
    stop: bool  # some process was asked to stop (SIGTERM / SIGINT)


def optimizer_step(
    accelerator, objective: nn.Module, optimizer, batches: Iterator[Tensor], step: int,
    lr: float, t: OptimConfig, stop_requested: Callable[[], bool],
) -> StepResult:
    """One optimizer step over `t.grad_accumulation` micro-batches."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    config = accelerator.unwrap_model(objective).model.config
    # One channel per image, or per frame of a clip (VideoTransformer.loss takes [B, T]).
    channels, frames = config.channels, (config.frames,) if config.frames else ()
    loss_sum, grad_norm = torch.zeros((), device=accelerator.device), torch.zeros(())
    skipped = stop = False
    for k in range(t.grad_accumulation):
        x, labels = split_batch(next(batches))
        seed = position_seed(t.seed, step * t.grad_accumulation + k, accelerator.process_index)
        torch.manual_seed(seed)  # dropout
        channel = torch.randint(channels, (x.shape[0], *frames),
                                generator=torch.Generator().manual_seed(seed + 1))
        if labels is not None and t.label_dropout:
            dropped = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed + 2))
            labels = torch.where(dropped.to(labels.device) < t.label_dropout, -1, labels)
        with accelerator.accumulate(objective):  # syncs gradients on the last micro-batch
            loss = objective(x, channel.to(x.device), labels)
            accelerator.backward(loss)
            loss_sum = loss_sum + loss.detach() / t.grad_accumulation
            if accelerator.sync_gradients:
                # An infinite max_norm clips nothing but still gives the norm to check.
                max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
                grad_norm = accelerator.clip_grad_norm_(objective.parameters(), max_norm)
                finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
                skipped, stop = agree(accelerator, not finite, stop_requested())
                if not skipped:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, skipped, stop)
