"""The paper's ImageNet-32 config, end to end on this CPU, through the entry points a user calls:
three optimizer steps of configs/imagenet32.yaml with a checkpoint after each, a resume for two
more, evaluation of 4 test images and one sample drawn from the EMA export.

    python bench/scale_rehearsal.py --stage train --run-dir /tmp/rehearsal   # then resume,
                                                                            # evaluate, sample

bench/scale_bench.py runs the stages one after another, each in a fresh process (peak memory is
per process), and prints their table; a stage prints one JSON line.

The data are the built-in photograph crops at 32 x 32 (the run's only changes to the config are
the data, the batch, the step counts, the run directory and the bookkeeping below), so the model,
its 341M parameters, bf16 autocast, the recipe and the checkpoint format are the paper run's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scale_cases import QUICK_DIM, directory_bytes, peak_rss_bytes

from axial_transformer.training import loop as training
from axial_transformer.training import startup as preflight
from axial_transformer.training.checkpoint import checkpoint_dirs, load_trained_model
from axial_transformer.training.config import load_config
from axial_transformer.training.run_log import read_records

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "imagenet32.yaml"
STAGES = ("train", "resume", "evaluate", "sample")
# Optimizer steps the run has done at the end of each training stage.
STEPS = {"train": 3, "resume": 5}
BATCH = 2
TEST_IMAGES = 4


def overrides(run_dir: Path, steps: int, quick: bool) -> list[str]:
    """The paper config's overrides: the built-in images, batch 2, a checkpoint after every
    step (one kept: a full-size checkpoint is 5.5 GB), 4 evaluated images at the end and no
    sample grid (its 16 images would take most of an hour; the sample stage draws one)."""
    return ["data.spec=builtin", "model.image_size=[32,32]", "data.workers=0",
            f"train.batch_size={BATCH}", f"train.steps={steps}", "checkpoint.every=1",
            "checkpoint.keep=1", "eval.every=0", f"eval.max_images={TEST_IMAGES}",
            "log.every=1", "log.sample_every=0", f"run_dir={run_dir}", "resume=auto",
            # bf16 as on the GPUs the config is for (auto picks fp32 on most CPUs), and torch's
            # own thread count, which scale_bench.py sets
            "train.mixed_precision=bf16", "train.threads=0",
            *([f"model.dim={QUICK_DIM}"] if quick else [])]


def time_calls(module, names: list[str], times: dict[str, list[float]]) -> None:
    """Wrap the functions `names` of `module` so that each call's wall time is appended to
    times[name]. training.py and preflight.py call them through their module's namespace, so
    the run is timed part by part without changing what it does."""
    for name in names:
        original: Callable = getattr(module, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                times.setdefault(_name, []).append(time.perf_counter() - start)

        setattr(module, name, timed)


def train_stage(run_dir: Path, stage: str, quick: bool) -> dict:
    """train() as train.py calls it on a CPU; the steps, checkpoint writes and reads and the
    final evaluation timed one by one."""
    cfg = load_config(CONFIG, overrides(run_dir, STEPS[stage], quick))
    times: dict[str, list[float]] = {}
    time_calls(training, ["optimizer_step", "save_checkpoint", "restore", "eval_record"], times)
    time_calls(preflight, ["select_checkpoint"], times)
    final = training.train(cfg)
    records = read_records(run_dir / "metrics.jsonl")
    starts = [r for r in records if "start" in r]
    losses = {r["step"]: r["train/loss_bpd"] for r in records if "train/loss_bpd" in r}
    newest = checkpoint_dirs(run_dir)[-1]
    return {"times": times, "started": f"{starts[-1]['start']} at step {starts[-1]['step']}",
            "losses": losses, "eval_bpd": final["eval/bpd"], "eval_images": final["eval/images"],
            "params": starts[-1]["parameters"], "checkpoint": newest.name,
            "checkpoint_bytes": directory_bytes(newest)}


def evaluate_stage(run_dir: Path) -> dict:
    """evaluate.py's library path: the run's EMA model on its first 4 test images, in fp32."""
    from accelerate import Accelerator

    from axial_transformer.data.splits import open_split
    from axial_transformer.evaluation import evaluate

    model, cfg = load_trained_model(run_dir)
    c = model.config
    test = open_split(cfg.data.spec, "test", c.image_size, c.channels, c.num_classes)
    metrics, _ = evaluate(model, test, Accelerator(cpu=True), TEST_IMAGES, TEST_IMAGES)
    return {"eval_bpd": metrics["bpd"], "eval_images": metrics["images"]}


def sample_stage(run_dir: Path) -> dict:
    """One image from the EMA export with the cached sampler (sample.py's library call)."""
    from axial_transformer.sampling.sampler import sample

    model, _ = load_trained_model(run_dir / "export")
    image = sample(model, 1, generator=torch.Generator().manual_seed(0))
    return {"shape": list(image.shape), "dtype": str(image.dtype).removeprefix("torch."),
            "mean_pixel": float(image.float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--quick", action="store_true", help=f"width {QUICK_DIM}: checks the "
                        "stages run, in seconds")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    start = time.perf_counter()
    if args.stage in STEPS:
        result = train_stage(run_dir, args.stage, args.quick)
    elif args.stage == "evaluate":
        result = evaluate_stage(run_dir)
    else:
        result = sample_stage(run_dir)
    result.update(seconds=time.perf_counter() - start, peak=peak_rss_bytes(),
                  threads=torch.get_num_threads())
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
