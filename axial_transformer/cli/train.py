"""Train an Axial Transformer; the same script runs on a CPU, a GPU or many GPUs.

    python train.py                                        # the demo (configs/demo.yaml)
    python train.py --config configs/imagenet32.yaml run_dir=runs/in32 train.lr=2e-4
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 \
        train.py --config configs/imagenet64.yaml run_dir=runs/in64
    torchrun --standalone --nproc_per_node 2 train.py --config configs/demo.yaml
    python train.py --config configs/imagenet32.yaml run_dir=runs/in32 resume=auto

Overrides are `section.key=value` (`--help` lists every key) or `run_dir=...`, `resume=...`. The
run writes config.yaml, metrics.jsonl, checkpoints/, export/ (EMA weights) and samples/ into
run_dir; run again when finished, it prints its results. SIGTERM or SIGINT saves what is not yet
saved and exits with code 0; `resume=auto` continues. docs/training.md has the details.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..training.config import RunConfig, load_config
from ..training.loop import train
from ..training.run_log import print_outputs
from ..training.signals import Preempted, Preemption
from .common import command_parser, run_command

# The presets live in the repository's configs/, beside the package.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def config_keys() -> str:
    """Every config key with its default, section by section, as the overrides spell them."""

    def spelled(value) -> str:  # true, [32,32], builtin, ''
        if isinstance(value, bool):
            return str(value).lower()
        return "''" if value == "" else str(value).replace(" ", "").replace("'", "")

    lines = ["config keys, as section.key=value with the value a key has unless the --config",
             "preset or an override sets it (axial_transformer/training/config.py says what each",
             "does):"]
    for section, values in RunConfig().to_dict().items():
        if not isinstance(values, dict):
            lines.append(f"  {section}={spelled(values)}")
            continue
        keys = " ".join(f"{key}={spelled(value)}" for key, value in values.items())
        lines.extend(textwrap.wrap(keys, 96, initial_indent=f"  {section + ':':<11} ",
                                   subsequent_indent=" " * 14))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(__doc__, checkpoint=False, epilog=config_keys(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEMO_CONFIG),
                        help="YAML preset (default: the CPU demo, configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return run_command(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    # SIGTERM and SIGINT until the process exits: train() handles them while it runs; before,
    # they stop the command at once; after, everything is saved or complete and they are only
    # noted, so that a signal while the results print or the interpreter shuts down still
    # leaves exit code 0. Never uninstalled: the default action would kill the process.
    outside = Preemption().install()
    try:
        if args.config == str(DEMO_CONFIG) and not DEMO_CONFIG.is_file():
            raise ValueError("the demo config (configs/demo.yaml) comes with the repository, "
                             "not the installed package: pass --config FILE")
        cfg = load_config(args.config, args.overrides)
        final = train(cfg)
    except Preempted as stop:  # before train() began, or just as it returned
        final = {"preempted": stop.signal_name, "checkpoint": None}
    finally:
        outside.defer()
    if "preempted" in final:
        if final["checkpoint"] is None:
            print(f"stopped by {final['preempted']} during start-up; nothing to save",
                  file=sys.stderr)
        else:
            print(f"stopped by {final['preempted']} at step {final['step']}; checkpoint "
                  f"{final['checkpoint']}; continue with resume=auto", file=sys.stderr)
        return 0
    if "outputs" not in final:  # another process than the main one
        return 0
    if "complete" in final:
        print(f"{cfg.run_dir} is already complete: it trained {final['complete']['step']} steps "
              f"(train.steps={cfg.train.steps}); raise train.steps to train on")
    print_comparison(final.get("complete", final))
    print_outputs(cfg.run_dir, final["outputs"])
    return 0


def print_comparison(final: dict) -> None:
    """The model's test bits/dim (and per channel), beside what lossless codecs spend on the
    same images when the run computed it."""
    channels = ", ".join(f"{k.removeprefix('eval/bpd_')} {v:.3f}" for k, v in final.items()
                         if k.startswith("eval/bpd_")
                         and k not in ("eval/bpd_no_class", "eval/bpd_frame"))
    frames = final.get("eval/bpd_frame")
    items = "clips, every subpixel of each" if frames else "images"
    print(f"\ntest bits/dim over {final['eval/images']} {items} (lower is better):")
    print(f"  {'Axial Transformer (EMA weights)':<34} {final['eval/bpd']:6.3f}  ({channels})")
    if frames:
        print(f"  {'  per frame':<34} {' '.join(f'{b:.3f}' for b in frames)}")
    if "eval/bpd_no_class" in final:
        print(f"  {'  the same told no class':<34} {final['eval/bpd_no_class']:6.3f}")
    if "baseline/png_bpd" in final and frames:
        print("  (the codecs below compress each frame as an image of its own)")
    if "baseline/png_bpd" in final:
        print(f"  {'JPEG XL lossless (effort 9)':<34} {final['baseline/jxl_bpd']:6.3f}")
        print(f"  {'WebP lossless (method 6)':<34} {final['baseline/webp_bpd']:6.3f}")
        print(f"  {'PNG (optimize, level 9)':<34} {final['baseline/png_bpd']:6.3f}")
