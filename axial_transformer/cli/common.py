"""What compress.py and decompress.py share: their common options, the model behind
--checkpoint, checked and atomic outputs, and errors reported as one line (exit code 2) unless
--debug is given."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.transformer import AxialTransformer


class CLIError(ValueError):
    """A problem with the command line or its inputs, reported as one line (exit code 2)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoint directory, export directory or Hub "
                        "repository id (the same model compresses and decompresses)")
    parser.add_argument("--debug", action="store_true",
                        default=os.environ.get("AXIAL_DEBUG") == "1",
                        help="show the traceback of an error (also AXIAL_DEBUG=1)")


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs: the file depends on none of it."""
    parser.add_argument("--device", default="cpu",
                        help="where the model runs, cpu or cuda (default cpu); a file written "
                        "on either decodes on either")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images the model computes at once (default 64)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (default: 1 below a batch of 8, where more are "
                        "slower, otherwise torch's)")


def load_model(checkpoint: str, device: str) -> AxialTransformer:
    """The model of a run, checkpoint or export directory, on `device`."""
    from ..training.checkpoint import load_trained_model

    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise CLIError(f"--device {device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {device}: the codec runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    model, _ = load_trained_model(checkpoint)
    return model.to(device)


def check_writable_file(path: Path, option: str, folder: bool = False) -> None:
    """Before any compute: `path` must be a file (or with `folder`, a folder) that can be
    written: no file in the way above it, and permission to write where it goes."""
    parent = path.parent
    if path.is_dir() and not folder:
        raise CLIError(f"{option} {path}: an existing folder; expected a file name")
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise CLIError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: cannot write in {existing} (permission denied)")


def write_output(path: Path, write: Callable[[Path], None]) -> None:
    """atomic_write, an OSError (a full or read-only disk) reported as one line naming the
    file: nothing is left behind."""
    from ..files import atomic_write

    try:
        atomic_write(path, write)
    except OSError as e:
        raise CLIError(f"could not write {path}: {e.strerror or e}") from None


def run_reporting_errors(run: Callable[[], int], debug: bool) -> int:
    """run(), with a bad input, a damaged file or the wrong model as one line on stderr and
    exit code 2; --debug lets the traceback through."""
    try:
        return run()
    except (ValueError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
