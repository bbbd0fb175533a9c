"""What a run tells its user: lines on stdout, records in RUN/metrics.jsonl, wandb, sample grids,
and where its outputs are.

metrics.jsonl holds one JSON object per line, each with the step it belongs to: a "start" record
at each start or resume, training records every log.every steps, evaluation records, the "final"
record once at the very end, and a "preempted" one for a run stopped by a signal. A resumed run
first drops what the interrupted one wrote past its checkpoint, so that after any sequence of
kills and resumes every step's records are there once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..files import atomic_write, atomic_write_text
from ..plots import write_loss_curve
from .config import RunConfig
from .ema import EMA
from .errors import SetupError, naming


class MetricsLog:
    """Shows records above the progress bar, appends them to metrics.jsonl and logs them to the
    trackers (main process only). A record is shown before it is written, so a write that fails
    (a full disk) loses no figure unseen. metrics.jsonl is opened with O_NOFOLLOW: the run
    appends to its own file only, never through a symbolic link."""

    def __init__(self, accelerator, path: Path, bar: tqdm) -> None:
        self.accelerator, self.path, self.bar = accelerator, path, bar

    def __call__(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.accelerator.is_main_process:
            return
        if echo:
            self.show(step, metrics)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with naming(self.path), open(os.open(self.path, flags, 0o666), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if "train/loss_bpd" in metrics or "eval/bpd" in metrics:  # RUN/loss_curve.png, kept current
            with naming(self.path.parent / "loss_curve.png"):
                write_loss_curve(self.path.parent)
        self.accelerator.log(scalars(metrics), step=step)

    def show(self, step: int, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            self.bar.write(" ".join(f"{k} {shown(v)}" for k, v in {"step": step,
                                                                   **metrics}.items()))


def shown(value) -> str:
    if isinstance(value, list):  # a video model's bits/dim per frame
        return "[" + " ".join(map(shown, value)) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def scalars(metrics: dict) -> dict:
    """A record as trackers take it: a list (bits/dim per frame) as one key per item,
    eval/bpd_frame/0, eval/bpd_frame/1, ..."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            flat.update({f"{key}/{k}": v for k, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


class TrainMeter:
    """The training record of the steps since the last one: their mean loss over every process
    (skipped steps left out), and the images per second."""

    def __init__(self, accelerator, batch_size: int) -> None:
        self.accelerator, self.batch_size = accelerator, batch_size
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.steps = self.good_steps = 0
        self.start = time.perf_counter()

    def add(self, loss: Tensor | None) -> None:
        """One step's mean loss, or None for a skipped step."""
        self.steps += 1
        if loss is not None:
            self.loss_sum += loss
            self.good_steps += 1

    def record(self, lr: float, skipped_steps: int, grad_norm: Tensor | None) -> dict:
        """The record (an all-reduce: every process calls it), and a fresh interval."""
        loss = self.accelerator.reduce(self.loss_sum, "mean").item() / max(1, self.good_steps)
        metrics = {"train/loss_bpd": loss if self.good_steps else None, "train/lr": lr,
                   "train/images_per_s": self.steps * self.batch_size / (
                       time.perf_counter() - self.start),
                   "train/skipped_steps": skipped_steps}
        if grad_norm is not None:  # null when not finite: metrics.jsonl stays strict JSON
            norm = float(grad_norm)
            metrics["train/grad_norm"] = norm if math.isfinite(norm) else None
        self.reset()
        return metrics


def read_records(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line that is not a JSON object with a step (torn by a
    crash, or damaged) is left out."""
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else ():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def drop_stale_records(path: Path, step: int, final: bool = False) -> None:
    """Forget what earlier attempts wrote past `step`, where this run continues: every record
    after it, the start and stop records at it, and with `final` the final record at it."""
    if not path.is_file():
        return
    redone = ("start", "preempted", "final") if final else ("start", "preempted")
    kept = [r for r in read_records(path) if r["step"] < step or
            (r["step"] == step and not any(key in r for key in redone))]
    with naming(path):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def final_record(path: Path, steps: int) -> dict | None:
    """The record a finished run wrote last, if the run in `path`'s directory got to `steps`."""
    finals = [r for r in read_records(path) if r.get("final") and r["step"] >= steps]
    return finals[-1] if finals else None


def eval_metrics(metrics: dict, channels: int) -> dict:
    from ..evaluation import channel_names

    record = {"eval/bpd": metrics["bpd"], "eval/images": metrics["images"],
              **{f"eval/bpd_{name}": bpd for name, bpd in zip(
                  channel_names(channels), metrics["bpd_channel"], strict=True)}}
    if "bpd_frame" in metrics:  # a video model's: frame t's bits/dim, a list
        record["eval/bpd_frame"] = metrics["bpd_frame"]
    return record


def save_samples(accelerator, ema: EMA, cfg: RunConfig, step: int) -> Path | None:
    """An EMA sample grid in RUN/samples/step_NNNNNNN.png (main process) and on wandb; a video
    model's clips as an animated GIF grid, step_NNNNNNN.gif, and their pixels beside it."""
    if not accelerator.is_main_process:
        return None
    if cfg.model.frames:
        return save_clip_samples(accelerator, ema, cfg, step)
    from PIL import Image
    from torchvision.utils import make_grid

    g = torch.Generator(accelerator.device).manual_seed(cfg.train.seed + step)
    n, classes = cfg.log.num_samples, cfg.model.num_classes
    labels = torch.arange(n) % classes if classes else None  # class after class
    images = ema.model.sample(n, generator=g, labels=labels).cpu()  # (N, C, H, W) uint8
    grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=255)
    grid = grid.permute(1, 2, 0).numpy()
    # Enlarged (nearest neighbour, pixels stay exact squares) so 32 x 32 samples are visible.
    zoom = max(1, 256 // grid.shape[1])
    picture = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom),
                                           Image.NEAREST)
    path = Path(cfg.run_dir) / "samples" / f"step_{step:07d}.png"
    with naming(path):
        atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    if cfg.log.wandb:
        accelerator.get_tracker("wandb").log_images({"samples": [picture]}, step=step)
    return path


def save_clip_samples(accelerator, ema: EMA, cfg: RunConfig, step: int) -> Path:
    """RUN/samples/step_NNNNNNN.gif (clips side by side, a GIF frame per frame) and .npy (uint8
    [N, T, H, W, C]). Sampled eagerly (the cached video sampler is not compiled); not sent to
    wandb, which would need a video encoder to show a clip."""
    import numpy as np

    from ..plots import clip_grid, save_gif

    g = torch.Generator(accelerator.device).manual_seed(cfg.train.seed + step)
    clips = ema.model.sample(cfg.log.num_samples, generator=g).cpu()  # (N, C, T, H, W) uint8
    pictures = clip_grid(clips, math.ceil(math.sqrt(len(clips))), cfg.model.levels)
    path = Path(cfg.run_dir) / "samples" / f"step_{step:07d}.gif"
    pixels = np.ascontiguousarray(clips.permute(0, 2, 3, 4, 1).numpy())

    def save_pixels(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save would append .npy to a temporary name
            np.save(f, pixels, allow_pickle=False)

    for file, write in ((path.with_suffix(".npy"), save_pixels),
                        (path, lambda tmp: save_gif(pictures, tmp))):
        with naming(file):
            atomic_write(file, write)
    return path


def init_trackers(accelerator, cfg: RunConfig) -> None:
    if not cfg.log.wandb:
        return
    try:
        import wandb  # noqa: F401  (an optional extra; Accelerate would skip it without a word)
    except ImportError as e:
        raise SetupError("log.wandb=true but wandb could not start: it is not installed. Install "
                         "it with `pip install -e '.[wandb]'`, or set log.wandb=false") from e
    try:
        accelerator.init_trackers(
            cfg.log.wandb_project, config=cfg.to_dict(),
            init_kwargs={"wandb": {"dir": cfg.run_dir, "name": Path(cfg.run_dir).name}},
        )
    except Exception as e:  # wandb raises many types (auth, network, usage): all fatal here
        raise SetupError(
            f"log.wandb=true but wandb could not start: {e}. Run `wandb login`, set "
            "WANDB_MODE=offline to log locally, or set log.wandb=false") from e


def run_outputs(run_dir: str | Path) -> dict[str, Path]:
    """What a run has written that a user looks for, by kind."""
    from .checkpoint import checkpoint_dirs

    run_dir = Path(run_dir)
    found = {"metrics": run_dir / "metrics.jsonl", "loss_curve": run_dir / "loss_curve.png",
             "export": run_dir / "export", "heatmap": run_dir / "heatmap.png",
             "checkpoint": (checkpoint_dirs(run_dir) or [None])[-1],
             "samples": (sorted((run_dir / "samples").glob("step_*.png"))
                         or sorted((run_dir / "samples").glob("step_*.gif")) or [None])[-1]}
    return {kind: path for kind, path in found.items() if path is not None and path.exists()}


def print_outputs(run_dir: str | Path, outputs: dict[str, Path], file=sys.stdout) -> None:
    notes = {"export": "EMA weights for sample.py and evaluate.py",
             "checkpoint": "resume=auto continues from it"}
    print(f"outputs in {run_dir}:", file=file)
    for kind, path in outputs.items():
        note = f"  ({notes[kind]})" if kind in notes else ""
        print(f"  {kind:<10} {path}{note}", file=file)
