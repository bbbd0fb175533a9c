"""One run over several processes: Accelerate's set-up, and the small all-reduces that keep every
process taking the same decisions (skip a step, stop, give up) so that none waits forever."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import SetupError
from .train_config import RunConfig


def cpu_only() -> bool:
    """No GPU (or other accelerator): Accelerate must be told, or under torchrun it runs every
    process as a separate single-process job instead of one gloo group."""
    if hasattr(torch, "accelerator"):
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def build_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    try:
        return Accelerator(
            cpu=cpu_only(),
            mixed_precision=cfg.train.mixed_precision,
            # Sync every `grad_accumulation` micro-batches, not at epoch ends: an optimizer step is
            # always the same number of images, which keeps the data position a function of step.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.train.grad_accumulation, sync_with_dataloader=False),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                      data_seed=cfg.train.seed),
            dynamo_backend="inductor" if cfg.train.compile else "no",
            log_with="wandb" if cfg.log.wandb else None,
            project_dir=cfg.run_dir,
        )
    except (ImportError, ValueError) as e:
        raise SetupError(f"could not set up Accelerate: {e}") from e


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag becomes True on every process if it is True on any: one small all-reduce."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(votes, "sum")]


def weights_fingerprint(model: nn.Module) -> Tensor:
    """Two numbers that change with any parameter: sum and sum of squares, in float64."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return torch.stack([flat.sum(), flat.square().sum()])


def replicas_in_sync(accelerator, model: nn.Module) -> bool:
    """Whether every process holds bit-identical weights (DDP keeps them so; this checks it)."""
    prints = accelerator.gather(weights_fingerprint(model)[None])  # (processes, 2)
    return bool((prints == prints[0]).all())
