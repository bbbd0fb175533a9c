"""Training with Hugging Face Accelerate: one loop for a CPU, a GPU or many, with exact resume.

The recipe is the paper's (official config_imagenet32.py): Adam(0.9, 0.999), linear warm-up then
a constant learning rate, gradient clipping at 1.0, the random-channel objective, and an EMA of
the weights that is what gets evaluated and sampled.

Resuming is exact: the learning rate, the data order, the channel drawn for each image and the
dropout masks are pure functions of the step (and the seed); the weights, Adam moments and EMA
are in the checkpoint. A run continued from a checkpoint takes the same steps, bit for bit, that
it would have taken without the interruption.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import (
    CHECKPOINT_PREFIX,
    check_disk_space,
    check_shapes,
    check_writable,
    checkpoint_dirs,
    checkpoint_problem,
    latest_checkpoint,
    prune_checkpoints,
    seal,
)
from .ema import EMA
from .evaluation import evaluate, lossless_bits_per_dim, save_heatmap
from .host_memory import keep_freed_memory
from .model import AxialTransformer
from .train_config import DebugConfig, OptimConfig, RunConfig, config_from_dict, save_config


class SetupError(RuntimeError):
    """The run cannot start as configured (a tracker that does not start, a run dir in use)."""


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
        self.model = model
        self.objective = objective

    def forward(self, x: Tensor, channel: Tensor) -> Tensor:
        return self.model.loss(x, self.objective, channel=channel)


def position_seed(seed: int, micro_batch: int, rank: int) -> int:
    """The seed of one micro-batch on one process. The channels it draws and its dropout masks
    come from this seed, so they are a pure function of the position in the run: a resumed run
    draws the same ones, whatever else consumed random numbers in between (a DataLoader draws a
    seed from the global generator each time an iterator starts, e.g. after a resume)."""
    return int(np.random.SeedSequence([seed, micro_batch, rank]).generate_state(1)[0])


def training_batches(loader: DataLoader, accelerator, position: int) -> Iterator[Tensor]:
    """Micro-batches forever, starting `position` micro-batches into the run.

    The prepared loader shuffles with a seedable sampler (seed + epoch), so epoch e has the same
    order in every run; a resume skips the batches of its epoch that were already used.
    """
    epoch, skip = divmod(position, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# Checkpoints: RUN/checkpoints/step_NNNNNNN/, sealed with a marker and renamed (checkpoint.py).


class TrainingError(RuntimeError):
    """The run cannot go on (it diverged); the message says what to change."""


def resume_checkpoint(cfg: RunConfig, warn: bool = True) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run."""
    if cfg.resume == "auto":
        return latest_checkpoint(cfg.run_dir, warn)
    if cfg.resume:
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise SetupError(f"resume={cfg.resume}: not a checkpoint directory "
                             f"(expected {Path(cfg.run_dir) / 'checkpoints' / 'step_NNNNNNN'})")
        problem = checkpoint_problem(path)
        if problem:
            raise SetupError(f"resume={cfg.resume}: {problem}")
        return path
    existing = checkpoint_dirs(cfg.run_dir)
    if existing:
        raise SetupError(f"{cfg.run_dir} already holds checkpoints ({existing[-1].name}); pass "
                         "resume=auto to continue that run, or choose another run_dir")
    return None


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def save_checkpoint(
    accelerator, model: nn.Module, ema: EMA, state: dict, run_dir: Path, keep: int,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNNN (state["step"]) under a temporary name, seal it with
    its marker, rename it, prune the old ones and refresh the EMA export."""
    for what, weights in (("weights", model), ("EMA weights", ema.model)):
        bad = nonfinite_parameter(weights)
        if bad:  # never replace a good checkpoint with a poisoned one
            raise TrainingError(f"the {what} hold NaN or inf ({bad}) at step {state['step']}; "
                                "not saving a checkpoint")
    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, Adam moments, RNG state of every process
    if accelerator.is_main_process:
        ema.save(tmp / "ema.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        seal(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep)
        ema.model.save_pretrained(run_dir / "export")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, objective: nn.Module, ema: EMA, path: Path) -> dict:
    """Restore a checkpoint after checking every tensor's shape; returns its trainer state."""
    def shapes(module: nn.Module) -> dict:
        return {k.replace("_orig_mod.", ""): tuple(v.shape)
                for k, v in module.state_dict().items()}

    check_shapes(path / "model.safetensors", shapes(accelerator.unwrap_model(objective)))
    check_shapes(path / "ema.safetensors", shapes(ema.model))
    accelerator.load_state(str(path))  # accelerate reads with torch.load(weights_only=True)
    ema.load(path / "ema.safetensors")
    return json.loads((path / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------
# Logging: stdout, RUN/metrics.jsonl and the trackers (wandb).


class MetricsLog:
    def __init__(self, accelerator, path: Path, bar: tqdm) -> None:
        self.accelerator = accelerator
        self.path = path
        self.bar = bar

    def __call__(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            self.bar.write(" ".join(f"{k} {_fmt(v)}" for k, v in record.items()))
        self.accelerator.log(metrics, step=step)


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the records an interrupted run wrote after its last checkpoint: the resumed run
    logs those steps again."""
    if not path.is_file():
        return
    from .io import atomic_write_text

    lines = path.read_text().splitlines(keepends=True)
    atomic_write_text(path, "".join(line for line in lines if json.loads(line)["step"] <= step))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def eval_metrics(metrics: dict, channels: int) -> dict:
    from .evaluation import channel_names

    out = {"eval/bpd": metrics["bpd"], "eval/images": metrics["images"]}
    for name, bpd in zip(channel_names(channels), metrics["bpd_channel"], strict=True):
        out[f"eval/bpd_{name}"] = bpd
    return out


def save_samples(accelerator, ema: EMA, cfg: RunConfig, step: int) -> Path | None:
    """An EMA sample grid in RUN/samples/step_NNNNNNN.png (main process) and on wandb."""
    if not accelerator.is_main_process:
        return None
    from PIL import Image
    from torchvision.utils import make_grid

    from .io import atomic_write

    g = torch.Generator(accelerator.device).manual_seed(cfg.train.seed + step)
    images = ema.model.sample(cfg.log.num_samples, generator=g).cpu()  # (N, C, H, W) uint8
    nrow = math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    # Enlarged (nearest neighbour, pixels stay exact squares) so 32 x 32 samples are visible.
    zoom = max(1, 256 // grid.shape[1])
    picture = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom),
                                           Image.NEAREST)
    path = Path(cfg.run_dir) / "samples" / f"step_{step:07d}.png"
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    if cfg.log.wandb:
        accelerator.get_tracker("wandb").log_images({"samples": [picture]}, step=step)
    return path


# ---------------------------------------------------------------------------------------------
# The run.


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


def init_trackers(accelerator, cfg: RunConfig) -> None:
    if not cfg.log.wandb:
        return
    try:
        accelerator.init_trackers(
            cfg.log.wandb_project, config=cfg.to_dict(),
            init_kwargs={"wandb": {"dir": cfg.run_dir, "name": Path(cfg.run_dir).name}},
        )
    except Exception as e:  # wandb raises many types (auth, network, usage): all fatal here
        raise SetupError(
            f"log.wandb=true but wandb could not start: {e}. Run `wandb login`, set "
            "WANDB_MODE=offline to log locally, or set log.wandb=false") from e


def micro_batch_size(cfg: RunConfig, processes: int) -> int:
    per_step = processes * cfg.train.grad_accumulation
    if cfg.train.batch_size % per_step:
        raise SetupError(f"train.batch_size={cfg.train.batch_size} must divide evenly among "
                         f"{processes} process(es) x train.grad_accumulation="
                         f"{cfg.train.grad_accumulation}")
    return cfg.train.batch_size // per_step


def prepare_run_dir(cfg: RunConfig, resuming: bool) -> None:
    """Save the resolved config; a resumed run must keep the model it was trained with."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    if resuming and saved.is_file():
        previous = config_from_dict(yaml.safe_load(saved.read_text()))
        if previous.model != cfg.model:
            raise SetupError(f"{saved} was trained with model {previous.model}, but this run "
                             f"asks for {cfg.model}; resume with the same model settings")
    save_config(cfg, saved)


@dataclass
class StepResult:
    loss: Tensor  # mean loss of the step's micro-batches on this process
    grad_norm: Tensor  # global gradient norm before clipping
    skipped: bool  # the loss or a gradient was not finite on some process: no update
    stop: bool  # some process was asked to stop (SIGTERM / SIGINT)


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag becomes True on every process if it is True on any: one small all-reduce, so
    that all processes skip the same steps and stop at the same step (none waits forever)."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(votes, "sum")]


def optimizer_step(
    accelerator, objective: nn.Module, optimizer, batches: Iterator[Tensor], step: int,
    lr: float, t: OptimConfig, debug: DebugConfig, stop_requested: Callable[[], bool],
) -> StepResult:
    """One optimizer step over `t.grad_accumulation` micro-batches, skipped (no update) when the
    loss or the gradient is not finite on any process."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    channels = accelerator.unwrap_model(objective).model.config.channels
    poisoned = step + 1 in debug.nan_at_steps and debug.rank in (-1, accelerator.process_index)
    loss_sum, grad_norm = torch.zeros((), device=accelerator.device), torch.zeros(())
    skipped = stop = False
    for k in range(t.grad_accumulation):
        x = next(batches)
        seed = position_seed(t.seed, step * t.grad_accumulation + k, accelerator.process_index)
        torch.manual_seed(seed)  # dropout
        channel = torch.randint(channels, (x.shape[0],),
                                generator=torch.Generator().manual_seed(seed + 1))
        with accelerator.accumulate(objective):  # syncs gradients on the last micro-batch
            loss = objective(x, channel.to(x.device))
            if poisoned:
                loss = loss * math.nan
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


class Preemption:
    """SIGTERM or SIGINT asks the run to checkpoint at the next step boundary and exit; a second
    signal ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals go to the main one
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def inject_faults(debug: DebugConfig, step: int, rank: int) -> None:
    """The debug section's kill and SIGTERM, right after step `step` (tests of resume)."""
    if debug.rank not in (-1, rank):
        return
    if step == debug.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    if step == debug.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)


def preflight(cfg: RunConfig):
    """Everything that can be checked before hours are spent, on every process alike (so that
    all of them stop, not one): the data, a writable run_dir with room for a checkpoint.
    Returns the train and test splits."""
    from .data import open_split

    mc = cfg.model
    train_set = open_split(cfg.data.spec, "train", mc.image_size, mc.channels)
    test_set = open_split(cfg.data.spec, "test", mc.image_size, mc.channels)
    check_writable(cfg.run_dir)
    with torch.device("meta"):  # the parameter count without allocating the weights
        num_parameters = AxialTransformer(mc).num_parameters()
    check_disk_space(cfg.run_dir, num_parameters, cfg.debug.free_bytes)
    return train_set, test_set


def train(cfg: RunConfig) -> dict:
    """Train, evaluate, checkpoint and export as `cfg` says; returns the final eval metrics, or
    {"preempted": signal name, "step", "checkpoint"} when SIGTERM / SIGINT stopped the run."""
    from accelerate.utils import set_seed

    train_set, test_set = preflight(cfg)
    accelerator = build_accelerator(cfg)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # ~10% faster CPU steps: activations stop page-faulting every step
    run_dir = Path(cfg.run_dir)
    resume_from = resume_checkpoint(cfg, warn=accelerator.is_main_process)
    micro = micro_batch_size(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        prepare_run_dir(cfg, resume_from is not None)
    accelerator.wait_for_everyone()
    init_trackers(accelerator, cfg)

    mc = cfg.model
    if len(train_set) < micro * accelerator.num_processes:
        raise SetupError(f"the train split has {len(train_set)} images, fewer than one batch "
                         f"({micro} per process x {accelerator.num_processes})")
    loader = DataLoader(train_set, batch_size=micro, shuffle=True, drop_last=True,
                        num_workers=cfg.data.workers)

    set_seed(cfg.train.seed)  # the same init on every process
    model = AxialTransformer(mc)
    ema = EMA(model, cfg.train.ema_decay)
    t = cfg.train
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                 weight_decay=t.weight_decay)
    objective, optimizer, loader = accelerator.prepare(Objective(model, t.objective), optimizer,
                                                       loader)
    ema.model.to(accelerator.device)
    state = {"step": 0, "skipped_steps": 0, "skipped_in_row": 0}
    if resume_from:
        state.update(load_checkpoint(accelerator, objective, ema, resume_from))
    step = state["step"]
    if resume_from and accelerator.is_main_process:
        drop_metrics_after(run_dir / "metrics.jsonl", step)

    bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    log = MetricsLog(accelerator, run_dir / "metrics.jsonl", bar)
    if accelerator.is_main_process:
        where = f"resuming from {resume_from}" if resume_from else "starting"
        bar.write(f"{where}: {model.num_parameters():,} parameters, {len(train_set)} train / "
                  f"{len(test_set)} test images on {accelerator.device}, batch {t.batch_size} = "
                  f"{micro} x {accelerator.num_processes} process(es) x {t.grad_accumulation} "
                  "accumulation")
    # The thread count is logged because CPU results are bit-identical only under the same one.
    log(step, {"parameters": model.num_parameters(), "processes": accelerator.num_processes,
               "threads": torch.get_num_threads(), "train_images": len(train_set),
               "test_images": len(test_set)}, echo=False)

    def run_eval(per_pixel: bool = False):
        return evaluate(ema.model, test_set, accelerator, cfg.eval.batch_size,
                        cfg.eval.max_images, cfg.eval.bf16, per_pixel, cfg.data.workers)

    def checkpoint() -> Path:
        state["step"] = step
        return save_checkpoint(accelerator, model, ema, state, run_dir, cfg.checkpoint.keep)

    batches = training_batches(loader, accelerator, step * t.grad_accumulation)
    loss_sum = torch.zeros((), device=accelerator.device)
    interval_steps, good_steps, interval_start = 0, 0, time.perf_counter()
    saved_at = step if resume_from else None
    with Preemption() as preemption:
        while step < t.steps:
            lr = learning_rate(step, t)
            result = optimizer_step(accelerator, objective, optimizer, batches, step, lr, t,
                                    cfg.debug, lambda: preemption.received is not None)
            if result.skipped:
                state["skipped_steps"] += 1
                state["skipped_in_row"] += 1
                if accelerator.is_main_process:
                    bar.write(f"step {step + 1}: non-finite loss or gradient, no update "
                              f"({state['skipped_in_row']} in a row)")
                if state["skipped_in_row"] >= t.max_skipped_steps:
                    bar.close()  # the error starts its own line
                    raise TrainingError(
                        f"{state['skipped_in_row']} steps in a row (up to step {step + 1}) had a "
                        "non-finite loss or gradient: the run diverged. Resume from the last "
                        "checkpoint with a lower train.lr, or raise train.max_skipped_steps")
            else:
                state["skipped_in_row"] = 0
                ema.update(model, step)
                loss_sum += result.loss
                good_steps += 1
            step += 1
            interval_steps += 1
            bar.update(1)

            if step % cfg.log.every == 0 or step == t.steps or result.stop:
                elapsed = time.perf_counter() - interval_start
                loss_bpd = accelerator.reduce(loss_sum, "mean").item() / max(1, good_steps)
                images_per_s = interval_steps * t.batch_size / elapsed
                metrics = {"train/loss_bpd": loss_bpd if good_steps else None, "train/lr": lr,
                           "train/images_per_s": images_per_s,
                           "train/skipped_steps": state["skipped_steps"]}
                if t.grad_clip > 0:  # null when not finite: metrics.jsonl stays strict JSON
                    norm = float(result.grad_norm)
                    metrics["train/grad_norm"] = norm if math.isfinite(norm) else None
                bar.set_postfix_str(f"loss {loss_bpd:.3f} bpd, {images_per_s:.1f} img/s")
                log(step, metrics)
                loss_sum.zero_()
                interval_steps, good_steps, interval_start = 0, 0, time.perf_counter()
            if result.stop:
                path = checkpoint() if saved_at != step else run_dir / "checkpoints" / (
                    f"{CHECKPOINT_PREFIX}{step:07d}")
                reason = preemption.received or "a signal to another process"
                log(step, {"preempted": reason})
                bar.close()
                accelerator.end_training()
                return {"preempted": reason, "step": step, "checkpoint": str(path)}
            if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
                log(step, eval_metrics(run_eval()[0], mc.channels))
            if cfg.log.sample_every and step % cfg.log.sample_every == 0 and step < t.steps:
                save_samples(accelerator, ema, cfg, step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
                checkpoint()
                saved_at = step
            inject_faults(cfg.debug, step, accelerator.process_index)
    bar.close()

    if saved_at != step:
        checkpoint()
    metrics, heatmap = run_eval(per_pixel=cfg.eval.heatmap)
    final = {**eval_metrics(metrics, mc.channels), "replicas_in_sync": replicas_in_sync(
        accelerator, model)}
    log(step, final)
    if cfg.log.sample_every:
        save_samples(accelerator, ema, cfg, step)
    if accelerator.is_main_process:
        if heatmap is not None:
            save_heatmap(heatmap, run_dir / "heatmap.png")
        if cfg.eval.baselines:
            final.update(codec_baselines(test_set, cfg.eval.max_images))
            log(step, {k: v for k, v in final.items() if k.startswith("baseline/")})
    accelerator.end_training()
    return final


def weights_fingerprint(model: nn.Module) -> Tensor:
    """Two numbers that change with any parameter: sum and sum of squares, in float64."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return torch.stack([flat.sum(), flat.square().sum()])


def replicas_in_sync(accelerator, model: nn.Module) -> bool:
    """Whether every process holds bit-identical weights (DDP keeps them so; this checks it)."""
    prints = accelerator.gather(weights_fingerprint(model)[None])  # (processes, 2)
    return bool((prints == prints[0]).all())


def codec_baselines(test_set, max_images: int = 0) -> dict:
    """bits/dim that PNG and WebP lossless spend on the test images, one file per image."""
    n = len(test_set) if max_images == 0 else min(max_images, len(test_set))
    images = np.stack([test_set[i].permute(1, 2, 0).numpy() for i in range(n)])  # (N, H, W, C)
    return {"baseline/png_bpd": lossless_bits_per_dim(images, "png"),
            "baseline/webp_bpd": lossless_bits_per_dim(images, "webp")}


def load_trained_model(path: str | Path) -> tuple[AxialTransformer, RunConfig | None]:
    """The EMA model of a run directory, one of its checkpoints, or an export directory, with
    the run's config when there is one (for its data spec)."""
    path = Path(path)

    def run_config(run_dir: Path) -> RunConfig | None:
        saved = run_dir / "config.yaml"
        return config_from_dict(yaml.safe_load(saved.read_text())) if saved.is_file() else None

    if (path / "config.json").is_file():  # an export: RUN/export or a copy of one
        return AxialTransformer.from_pretrained(path), run_config(path.parent)
    if (path / "trainer_state.json").is_file():  # RUN/checkpoints/step_NNNNNNN
        cfg = run_config(path.parent.parent)
        if cfg is None:
            raise FileNotFoundError(f"{path.parent.parent / 'config.yaml'} not found: a "
                                    "checkpoint is read with its run's config")
        ema = EMA(AxialTransformer(cfg.model), cfg.train.ema_decay)
        check_shapes(path / "ema.safetensors",
                     {k: tuple(v.shape) for k, v in ema.model.state_dict().items()})
        ema.load(path / "ema.safetensors")
        return ema.model, cfg
    if (path / "export" / "config.json").is_file():  # a run directory
        return AxialTransformer.from_pretrained(path / "export"), run_config(path)
    raise FileNotFoundError(f"{path}: expected a run directory, one of its checkpoints "
                            "(checkpoints/step_NNNNNNN) or an export (config.json + "
                            "model.safetensors)")
