"""One run over several processes: Accelerate's set-up, and the small all-reduces that keep every
process taking the same decisions (skip a step, stop, give up) so that none waits forever."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..precision import Precision, choose_precision
from .config import RunConfig
from .errors import SetupError


def cpu_only() -> bool:
    """No GPU (or other accelerator): Accelerate must be told, or under torchrun it runs every
    process as a separate single-process job instead of one gloo group."""
    if hasattr(torch, "accelerator"):
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def build_accelerator(cfg: RunConfig):
    """Accelerate's set-up, with train.threads CPU threads and train.mixed_precision's choice on
    this device, which the main process prints first."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        state = PartialState(cpu=cpu_only())  # the process group, for the processes to agree
        precision = agreed_precision(state, choose_precision(cfg.train.mixed_precision,
                                                             state.device, cfg.model.dim))
        if state.is_main_process:
            print(f"precision: {precision}; {torch.get_num_threads()} CPU thread(s) "
                  f"(train.threads), CPU capability {torch.backends.cpu.get_cpu_capability()}",
                  flush=True)
        return Accelerator(
            cpu=cpu_only(),
            mixed_precision="bf16" if precision.bf16 else "no",
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


def agreed_precision(state, precision: Precision) -> Precision:
    """fp32 on every process unless all chose bf16: each process times its own bf16 check, and
    one that found bf16 slow (a busy core) must not leave the others computing in another."""
    if state.num_processes == 1:
        return precision
    votes = torch.tensor([float(precision.bf16)], device=state.device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MIN)
    if precision.bf16 and not votes.item():
        return Precision(False, "auto: another process found bf16 slow")
    return precision


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag becomes True on every process if it is True on any: one small all-reduce."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(votes, "sum")]


def weights_fingerprint(model: nn.Module) -> Tensor:
    """Sum and sum of squares of the parameters in float64: they change with any of them."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return torch.stack([flat.sum(), flat.square().sum()])


def replicas_in_sync(accelerator, model: nn.Module) -> bool:
    """Whether every process holds bit-identical weights (DDP keeps them so; this checks it)."""
    prints = accelerator.gather(weights_fingerprint(model)[None])  # (processes, 2)
    return bool((prints == prints[0]).all())
