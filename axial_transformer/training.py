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
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .ema import EMA
from .evaluation import evaluate, lossless_bits_per_dim, save_heatmap
from .model import AxialTransformer
from .train_config import OptimConfig, RunConfig, config_from_dict, save_config

CHECKPOINT_PREFIX = "step_"


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
# Checkpoints: RUN/checkpoints/step_NNNNNNN/, written under a temporary name and renamed.


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a partial one keeps its temporary name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and p.name[len(CHECKPOINT_PREFIX):].isdigit())


def resume_checkpoint(cfg: RunConfig) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run."""
    existing = checkpoint_dirs(cfg.run_dir)
    if cfg.resume == "auto":
        return existing[-1] if existing else None
    if cfg.resume:
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise SetupError(f"resume={cfg.resume}: not a checkpoint directory "
                             f"(expected {Path(cfg.run_dir) / 'checkpoints' / 'step_NNNNNNN'})")
        return path
    if existing:
        raise SetupError(f"{cfg.run_dir} already holds checkpoints ({existing[-1].name}); pass "
                         "resume=auto to continue that run, or choose another run_dir")
    return None


def save_checkpoint(accelerator, ema: EMA, step: int, run_dir: Path, keep: int) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, Adam moments, RNG state of every process
    if accelerator.is_main_process:
        ema.save(tmp / "ema.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
        ema.model.save_pretrained(run_dir / "export")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ema: EMA, path: Path) -> int:
    accelerator.load_state(str(path))  # accelerate reads with torch.load(weights_only=True)
    ema.load(path / "ema.safetensors")
    return int(json.loads((path / "trainer_state.json").read_text())["step"])


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


def optimizer_step(
    accelerator, objective: nn.Module, optimizer, batches: Iterator[Tensor], step: int,
    lr: float, t: OptimConfig,
) -> tuple[Tensor, Tensor]:
    """One optimizer step over `t.grad_accumulation` micro-batches -> (mean loss, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    channels = accelerator.unwrap_model(objective).model.config.channels
    loss_sum, grad_norm = 0.0, torch.zeros(())
    for k in range(t.grad_accumulation):
        x = next(batches)
        seed = position_seed(t.seed, step * t.grad_accumulation + k, accelerator.process_index)
        torch.manual_seed(seed)  # dropout
        channel = torch.randint(channels, (x.shape[0],),
                                generator=torch.Generator().manual_seed(seed + 1))
        with accelerator.accumulate(objective):  # syncs gradients on the last micro-batch
            loss = objective(x, channel.to(x.device))
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(objective.parameters(), t.grad_clip)
            optimizer.step()  # a no-op until the gradients are synced
            optimizer.zero_grad(set_to_none=True)
        loss_sum = loss_sum + loss.detach() / t.grad_accumulation
    return loss_sum, grad_norm


def train(cfg: RunConfig) -> dict:
    """Train, evaluate, checkpoint and export as `cfg` says; returns the final eval metrics."""
    from accelerate.utils import set_seed

    from .data import open_split

    accelerator = build_accelerator(cfg)
    run_dir = Path(cfg.run_dir)
    resume_from = resume_checkpoint(cfg)
    micro = micro_batch_size(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_run_dir(cfg, resume_from is not None)
    accelerator.wait_for_everyone()
    init_trackers(accelerator, cfg)

    mc = cfg.model
    train_set = open_split(cfg.data.spec, "train", mc.image_size, mc.channels)
    test_set = open_split(cfg.data.spec, "test", mc.image_size, mc.channels)
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
    step = load_checkpoint(accelerator, ema, resume_from) if resume_from else 0
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
    log(step, {"parameters": model.num_parameters(), "processes": accelerator.num_processes,
               "train_images": len(train_set), "test_images": len(test_set)}, echo=False)

    def run_eval(per_pixel: bool = False):
        return evaluate(ema.model, test_set, accelerator, cfg.eval.batch_size,
                        cfg.eval.max_images, cfg.eval.bf16, per_pixel, cfg.data.workers)

    batches = training_batches(loader, accelerator, step * t.grad_accumulation)
    loss_sum = torch.zeros((), device=accelerator.device)
    interval_steps, interval_start = 0, time.perf_counter()
    while step < t.steps:
        lr = learning_rate(step, t)
        loss, grad_norm = optimizer_step(accelerator, objective, optimizer, batches, step, lr, t)
        loss_sum += loss
        ema.update(model, step)
        step += 1
        interval_steps += 1
        bar.update(1)

        if step % cfg.log.every == 0 or step == t.steps:
            elapsed = time.perf_counter() - interval_start
            loss_bpd = accelerator.reduce(loss_sum, "mean").item() / interval_steps
            images_per_s = interval_steps * t.batch_size / elapsed
            metrics = {"train/loss_bpd": loss_bpd, "train/lr": lr,
                       "train/images_per_s": images_per_s}
            if t.grad_clip > 0:
                metrics["train/grad_norm"] = float(grad_norm)
            bar.set_postfix_str(f"loss {loss_bpd:.3f} bpd, {images_per_s:.1f} img/s")
            log(step, metrics)
            loss_sum.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
            log(step, eval_metrics(run_eval()[0], mc.channels))
        if cfg.log.sample_every and step % cfg.log.sample_every == 0 and step < t.steps:
            save_samples(accelerator, ema, cfg, step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < t.steps:
            save_checkpoint(accelerator, ema, step, run_dir, cfg.checkpoint.keep)
    bar.close()

    if not (resume_from and resume_from.name == f"{CHECKPOINT_PREFIX}{step:07d}"):
        save_checkpoint(accelerator, ema, step, run_dir, cfg.checkpoint.keep)
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
        ema.load(path / "ema.safetensors")
        return ema.model, cfg
    if (path / "export" / "config.json").is_file():  # a run directory
        return AxialTransformer.from_pretrained(path / "export"), run_config(path)
    raise FileNotFoundError(f"{path}: expected a run directory, one of its checkpoints "
                            "(checkpoints/step_NNNNNNN) or an export (config.json + "
                            "model.safetensors)")
