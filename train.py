"""Train an Axial Transformer; the same script runs on a CPU, a GPU or many GPUs.

    python train.py                                        # the demo (configs/demo.yaml)
    python train.py --config configs/imagenet32.yaml run_dir=runs/in32 train.lr=2e-4
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 \
        train.py --config configs/imagenet64.yaml run_dir=runs/in64
    torchrun --standalone --nproc_per_node 2 train.py --config configs/demo.yaml
    python train.py --config configs/imagenet32.yaml run_dir=runs/in32 resume=auto

Overrides are `section.key=value` (model, data, train, eval, log, checkpoint) or `run_dir=...`,
`resume=...`; see axial_transformer/train_config.py for every key. The run writes config.yaml,
metrics.jsonl, checkpoints/, export/ (EMA weights for sample.py) and samples/ into run_dir.

SIGTERM or SIGINT (Ctrl-C) saves a checkpoint at the next step boundary and exits with code 0;
`resume=auto` continues it. Bad input stops the run at start-up with one line on stderr and exit
code 2; --debug (or AXIAL_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from axial_transformer.train_config import load_config
from axial_transformer.training import SetupError, TrainingError, train

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG),
                        help="YAML preset (default: the CPU demo, configs/demo.yaml)")
    parser.add_argument("--debug", action="store_true",
                        default=os.environ.get("AXIAL_DEBUG") == "1",
                        help="show the traceback of an error (also AXIAL_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        final = train(cfg)
    except (ValueError, SetupError, TrainingError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "preempted" in final:
        print(f"stopped by {final['preempted']} at step {final['step']}; checkpoint "
              f"{final['checkpoint']}; continue with resume=auto", file=sys.stderr)
        return 0
    if "baseline/png_bpd" in final:
        print_comparison(final)
    return 0


def print_comparison(final: dict) -> None:
    """The model's test bits/dim beside what lossless codecs spend on the same images."""
    rows = [("Axial Transformer (EMA weights)", final["eval/bpd"]),
            ("WebP lossless (method 6)", final["baseline/webp_bpd"]),
            ("PNG (optimize, level 9)", final["baseline/png_bpd"])]
    print(f"\ntest bits/dim over {final['eval/images']} images (lower is better):")
    for name, bpd in rows:
        print(f"  {name:<34} {bpd:6.3f}")


if __name__ == "__main__":
    sys.exit(main())
