"""What the commands share: --checkpoint and --debug, the --device check, outputs checked before
the compute and written whole or not at all, and errors as one line (exit code 2)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..training.errors import SetupError, TrainingError, one_line


class CLIError(ValueError):
    """A problem with the command line or its inputs, reported as one line (exit code 2)."""


def command_parser(doc: str, checkpoint: bool = True, **kwargs) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of `doc`, with --debug and --checkpoint."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], **kwargs)
    if checkpoint:
        parser.add_argument("--checkpoint", required=True,
                            help="run directory, checkpoint directory, export directory or Hub "
                            "repository id (owner/name)")
    parser.add_argument("--debug", action="store_true",
                        default=os.environ.get("AXIAL_DEBUG") == "1",
                        help="show the traceback of an error (also AXIAL_DEBUG=1)")
    return parser


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args), with a bad input, a damaged file or a failed write as one line on stderr and
    exit code 2; --debug lets the traceback through."""
    try:
        return run(args)
    except (ValueError, OSError, SetupError, TrainingError) as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def check_positive(args: argparse.Namespace, *options: str) -> None:
    for option in options:
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None and value < 1:
            raise CLIError(f"{option} must be at least 1, got {value}")


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise CLIError(f"--device {text!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: CUDA is not available on this machine")
    return device


def check_output(path: Path, option: str, needed_bytes: int = 0, replace: bool = True,
                 folder: bool = False) -> None:
    """Before the compute, as a command that cannot write its result has wasted it: refuse a
    folder where a file goes (or the reverse), a path under a file, a folder not writable or
    without `needed_bytes` free, and unless `replace`, an output that exists."""
    if path.exists():
        if path.is_dir() != folder:
            found, expected = ("file", "folder") if folder else ("folder", "file")
            raise CLIError(f"{option} {path}: an existing {found}; expected a {expected} name")
        if not replace:
            raise CLIError(f"{option} {path}: exists already (from an earlier run); choose "
                           "another name, or pass --overwrite to replace it")
    parent = next(p for p in path.parents if p.exists())  # what the write would fill in
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: cannot write into {parent} (read-only or not "
                       "permitted)")
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise CLIError(f"{option} {path}: {parent} has {free:,} bytes free, the output needs "
                       f"about {needed_bytes:,}")


def save_npy(path: Path, pixels: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save would append .npy to a temporary name
        np.save(f, pixels, allow_pickle=False)


def save_pngs(folder: Path, pixels: np.ndarray, names: list[str] | None = None) -> None:
    """One PNG per image of uint8 [N, H, W, C]: `names`, or 00000.png, 00001.png, ..."""
    from PIL import Image

    digits = max(5, len(str(len(pixels) - 1)))
    for k, image in enumerate(pixels):
        name = names[k] if names else f"{k:0{digits}d}.png"
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / name, "PNG")


def write_outputs(outputs: dict[Path, Callable[[Path], None]],
                  folders: tuple[Path, ...] = ()) -> None:
    """Each output written atomically by `write(tmp)`, the paths in `folders` as folders: all of
    them or, after an OSError, none, the error naming the output it hit."""
    done = []
    for path, write in outputs.items():
        try:
            if path in folders:
                files.replace_folder(path, write)
            else:
                files.atomic_write(path, write)
        except OSError as e:
            for written in done:
                if written.is_dir():
                    shutil.rmtree(written)
                else:
                    written.unlink()
            raise CLIError(f"could not write {path}: {e.strerror or e}") from None
        done.append(path)


def codec_parser(doc: str) -> argparse.ArgumentParser:
    """compress's and decompress's parser: also where and how the model runs, on which the file
    depends not at all."""
    parser = command_parser(doc)
    parser.add_argument("--device", default="cpu",
                        help="where the model runs, cpu or cuda (default cpu); a file written "
                        "on either decodes on either")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images the model computes at once (default 64)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (default: 1 below a batch of 8, where more are "
                        "slower, otherwise torch's)")
    return parser


def load_model(args: argparse.Namespace):
    """compress's and decompress's model, of --checkpoint on --device (cpu or cuda)."""
    from ..training.checkpoint import load_trained_model

    check_positive(args, "--batch-size", "--threads")
    device = parse_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {device}: the codec runs on cpu or cuda")
    model, _ = load_trained_model(args.checkpoint)
    if model.config.frames:
        raise CLIError(f"{args.checkpoint}: the codec compresses images; this is a video model "
                       f"(clips of {model.config.frames} frames)")
    return model.to(device)
