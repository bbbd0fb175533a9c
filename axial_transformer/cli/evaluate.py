"""Exact test bits/dim of a trained model over a whole test split (the run's own data unless
--data; fp32 unless --bf16).

    python evaluate.py --checkpoint runs/demo                      # the run's EMA export
    python evaluate.py --checkpoint runs/in32/checkpoints/step_0100000 --heatmap bits.png
    python evaluate.py --checkpoint runs/in32/export --data data/imagenet32 --baselines
    torchrun --standalone --nproc_per_node 8 evaluate.py --checkpoint runs/in64
    python evaluate.py --checkpoint runs/video-demo           # a video model: also per frame

A video model's bits/dim is the mean over every subpixel of each clip (the figure video papers
report), printed with each frame's; its heatmap shows the frames top to bottom, and the codec
baselines encode each frame as an image of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.sources import SPLITS
from ..evaluation import channel_names, codec_baselines, evaluate, save_heatmap
from ..training.checkpoint import load_trained_model
from ..training.distributed import cpu_only
from .common import CLIError, check_output, check_positive, command_parser, run_command


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(__doc__)
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
                        help="also print the bits/dim of JPEG XL, WebP and PNG lossless")
    parser.add_argument("--no-class", action="store_true",
                        help="class-conditional models: score the images told 'no class' (the "
                        "unconditional model of a run trained with train.label_dropout)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return run_command(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from ..data.splits import open_split

    if args.split not in SPLITS:
        raise CLIError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    check_positive(args, "--batch-size")
    if args.max_images < 0:
        raise CLIError(f"--max-images must be 0 or more, got {args.max_images}")
    model, cfg = load_trained_model(args.checkpoint)
    spec = args.data or (cfg.data.spec if cfg else None)
    if spec is None:
        raise CLIError(f"{args.checkpoint} has no run config to take the data from; pass --data")
    c = model.config
    if args.no_class and not c.num_classes:
        raise CLIError("--no-class needs a class-conditional model")
    dataset = open_split(spec, args.split, c.image_size, c.channels, c.num_classes, trained=True,
                         frames=c.frames)
    if args.heatmap is not None:  # before the compute, not after it
        check_output(Path(args.heatmap), "--heatmap")

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
    k = c.num_classes
    metrics["conditioned_on"] = ("nothing (an unconditional model)" if not k else
                                 f"no class (a model of {k} classes told none)" if args.no_class
                                 else f"each image's class ({k} classes)")
    if args.json:
        print(json.dumps(metrics), flush=True)
    else:
        per_channel = ", ".join(f"{n} {b:.4f}" for n, b in zip(
            channel_names(c.channels), metrics["bpd_channel"], strict=True))
        items = f"clips of {c.frames} frames" if c.frames else "images"
        print(f"{args.split} bits/dim {metrics['bpd']:.4f} over {metrics['images']} {items} of "
              f"{spec} ({per_channel}){' [bf16]' if args.bf16 else ''}, conditioned on "
              f"{metrics['conditioned_on']}")
        if c.frames:
            print(f"  per frame: {' '.join(f'{b:.4f}' for b in metrics['bpd_frame'])}")
            if args.baselines:
                print("  the codecs compress each frame as an image of its own:")
        for codec in ("jxl", "webp", "png"):
            if f"baseline/{codec}_bpd" in metrics:
                print(f"  {codec} lossless: {metrics[f'baseline/{codec}_bpd']:.4f} bits/dim")
        sys.stdout.flush()
    if heatmap is not None:
        try:  # after the figures: a disk that fails here does not take them with it
            save_heatmap(heatmap, args.heatmap)
        except OSError as e:
            raise CLIError(f"could not write the heatmap {args.heatmap}: {e.strerror or e}"
                           ) from None
        if not args.json:
            print(f"heatmap: {args.heatmap}")
    return 0
