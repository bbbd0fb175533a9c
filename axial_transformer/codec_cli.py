"""What compress.py and decompress.py share: their common options, the model behind
--checkpoint, and errors reported as one line (exit code 2) unless --debug is given."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from .model import AxialTransformer


class CLIError(ValueError):
    """A problem with the command line or its inputs, reported as one line (exit code 2)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoint directory, export directory or Hub "
                        "repository id (the same model compresses and decompresses)")
    parser.add_argument("--debug", action="store_true",
                        default=os.environ.get("AXIAL_DEBUG") == "1",
                        help="show the traceback of an error (also AXIAL_DEBUG=1)")


def load_model(checkpoint: str, device: str) -> AxialTransformer:
    """The model of a run, checkpoint or export directory, on `device`."""
    from .checkpoint import load_trained_model

    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise CLIError(f"--device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    model, _ = load_trained_model(checkpoint)
    return model.to(device)


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
