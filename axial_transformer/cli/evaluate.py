"""Exact test bits/dim of a trained model over a whole test split.

    python evaluate.py --checkpoint runs/demo                      # the run's EMA export
    python evaluate.py --checkpoint runs/in32/checkpoints/step_0100000 --heatmap bits.png
    python evaluate.py --checkpoint runs/in32/export --data data/imagenet32 --baselines
    torchrun --standalone --nproc_per_node 8 evaluate.py --checkpoint runs/in64

--checkpoint takes a run directory, one of its checkpoints or an export directory; the data
defaults to the run's own (data.spec in its config.yaml). Evaluation runs in fp32 unless --bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..data.sources import SPLITS
from ..evaluation import channel_names, codec_baselines, evaluate, save_heatmap
from ..outputs import check_output
from ..training.checkpoint import load_trained_model
from ..training.distributed import cpu_only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true",
                        default=os.environ.get("AXIAL_DEBUG") == "1",
                        help="show the traceback of an error (also AXIAL_DEBUG=1)")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoint directory, export directory or Hub "
                        "repository id (owner/name)")
    parser.add_argument("--data", help="data spec: builtin, a .npy file or a directory with "
                        "test.npy (default: the run's data.spec)")
    parser.add_argument("--split", default="test", help=f"one of {', '.join(SPLITS)}")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--max-images", type=int, default=0,
                        help="score only the first N images (0: the whole split)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast instead of fp32 (warns on a CPU that emulates bf16)")
    parser.add_argument("--heatmap", metavar="PNG", help="write the bits-per-pixel heatmap here")
    parser.add_argument("--baselines", action="store_true",
                        help="also print the bits/dim of PNG and WebP lossless")
    parser.add_argument("--no-class", action="store_true",
                        help="class-conditional models: score the images told 'no class' (the "
                        "unconditional model of a run trained with train.label_dropout)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from ..data.splits import open_split

    try:
        if args.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
        model, cfg = load_trained_model(args.checkpoint)
        spec = args.data or (cfg.data.spec if cfg else None)
        if spec is None:
            raise ValueError(f"{args.checkpoint} has no run config to take the data from; "
                             "pass --data")
        if args.batch_size < 1 or args.max_images < 0:
            raise ValueError("--batch-size must be >= 1 and --max-images >= 0")
        c = model.config
        if args.no_class and not c.num_classes:
            raise ValueError("--no-class needs a class-conditional model")
        dataset = open_split(spec, args.split, c.image_size, c.channels, c.num_classes,
                             trained=True)
        if args.heatmap is not None:  # before the compute, not after it
            check_output(Path(args.heatmap), "--heatmap", replace=True)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2

    accelerator = Accelerator(cpu=cpu_only())
    model.to(accelerator.device)
    metrics, heatmap = evaluate(model, dataset, accelerator, args.batch_size, args.max_images,
                                args.bf16, per_pixel=args.heatmap is not None,
                                progress=accelerator.is_main_process, no_class=args.no_class)
    accelerator.end_training()  # closes the process group cleanly before the processes exit
    if not accelerator.is_main_process:
        return 0
    if args.baselines:
        metrics.update(codec_baselines(dataset, args.max_images, progress=True))
    metrics["conditioned_on"] = conditioned_on(c.num_classes, args.no_class)
    report(args, metrics, spec, c.channels)
    if heatmap is not None:
        try:  # after the figures: a disk that fails here does not take them with it
            save_heatmap(heatmap, args.heatmap)
        except OSError as e:
            if args.debug:
                raise
            print(f"error: could not write the heatmap {args.heatmap}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
        if not args.json:
            print(f"heatmap: {args.heatmap}")
    return 0


def report(args: argparse.Namespace, metrics: dict, spec: str, channels: int) -> None:
    if args.json:
        print(json.dumps(metrics), flush=True)
        return
    names = channel_names(channels)
    per_channel = ", ".join(f"{n} {b:.4f}" for n, b in zip(names, metrics["bpd_channel"],
                                                           strict=True))
    print(f"{args.split} bits/dim {metrics['bpd']:.4f} over {metrics['images']} images of {spec} "
          f"({per_channel}){' [bf16]' if args.bf16 else ''}, conditioned on "
          f"{metrics['conditioned_on']}")
    for codec in ("jxl", "webp", "png"):
        if f"baseline/{codec}_bpd" in metrics:
            print(f"  {codec} lossless: {metrics[f'baseline/{codec}_bpd']:.4f} bits/dim")
    sys.stdout.flush()


def conditioned_on(num_classes: int, no_class: bool) -> str:
    if not num_classes:
        return "nothing (an unconditional model)"
    if no_class:
        return f"no class (a model of {num_classes} classes told none)"
    return f"each image's class ({num_classes} classes)"
