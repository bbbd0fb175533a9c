"""Checkpoints that a crash cannot corrupt, and the start-up checks that keep a long run from
failing hours in.

A checkpoint RUN/checkpoints/step_NNNNNNN/ is written under a temporary name, every file is
fsynced, and a marker (complete.json, the size of every file) is written last before the rename.
Resuming takes the newest checkpoint whose marker is there and whose files still have the sizes
it lists and readable safetensors headers; a newer one that fails is named in a warning and
skipped. Pruning keeps the newest `keep` complete checkpoints and never deletes the only one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CHECKPOINT_PREFIX = "step_"
MARKER = "complete.json"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every RUN/checkpoints/step_NNNNNNN directory, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and p.name[len(CHECKPOINT_PREFIX):].isdigit())


def seal(directory: Path) -> None:
    """Flush every file of a freshly written checkpoint to disk, then write the marker."""
    sizes = {}
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name != MARKER:
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
            sizes[file.name] = file.stat().st_size
    marker = directory / MARKER
    marker.write_text(json.dumps({"files": sizes}, indent=1))
    with open(marker, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` cannot be resumed from (missing marker, a file missing, truncated or
    unreadable), or None when it looks whole."""
    try:
        sizes = json.loads((directory / MARKER).read_text())["files"]
    except FileNotFoundError:
        return f"no {MARKER} marker (the write did not finish)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} ({e})"
    for name, size in sizes.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the marker says {size} (truncated?)"
        if name.endswith(".safetensors"):
            try:
                safetensors_shapes(file)
            except ValueError as e:
                return str(e)
    return None


def latest_checkpoint(run_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that is whole; each newer broken one is named on stderr."""
    for directory in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        if warn:
            print(f"warning: skipping checkpoint {directory}: {problem}; trying the previous one",
                  file=sys.stderr)
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and broken ones older than the
    newest complete one. Nothing is deleted while no checkpoint is complete. Returns what went."""
    directories = checkpoint_dirs(run_dir)
    complete = [d for d in directories if checkpoint_problem(d) is None]
    if not complete:
        return []
    kept = set(complete[-keep:])
    newest = complete[-1]
    doomed = [d for d in directories if d not in kept and d.name < newest.name]
    for directory in doomed:
        shutil.rmtree(directory)
    return doomed


# ---------------------------------------------------------------------------------------------
# Shapes: a checkpoint from another configuration is named, parameter by parameter.


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading (or unpickling) any data."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def check_shapes(file: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise a ValueError naming the first parameter whose shape in `file` differs."""
    found = safetensors_shapes(file)
    for name, shape in expected.items():
        if name not in found:
            raise ValueError(f"{file}: has no parameter {name}; it was saved from another "
                             "model configuration")
        if found[name] != tuple(shape):
            raise ValueError(f"{file}: parameter {name} has shape {list(found[name])}, this model "
                             f"expects {list(shape)}: the checkpoint is from another model "
                             "configuration")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{file}: has parameter {extra[0]} that this model lacks; it was saved "
                         "from another model configuration")


# ---------------------------------------------------------------------------------------------
# Start-up checks on the output directory.


def check_writable(run_dir: str | Path) -> None:
    """Create `run_dir` and a file in it, or raise a ValueError saying why not."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write_test."):
            pass
    except OSError as e:
        raise ValueError(f"run_dir {run_dir} cannot be written: {e.strerror or e}") from None


def checkpoint_bytes(num_parameters: int, bytes_per_value: int = 4) -> int:
    """Disk room one checkpoint needs: the weights, Adam's two moments and the EMA, plus the
    EMA export, with a quarter more and 64 MiB for RNG states, metadata and file-system slack."""
    copies = 1 + 2 + 1 + 1
    return int(num_parameters * bytes_per_value * copies * 1.25) + 64 * 2**20


def check_disk_space(run_dir: str | Path, num_parameters: int, free_bytes: int = -1) -> None:
    """Raise a ValueError when the disk of `run_dir` cannot hold one more checkpoint.
    `free_bytes` >= 0 stands in for the disk's own figure (tests)."""
    need = checkpoint_bytes(num_parameters)
    free = shutil.disk_usage(run_dir).free if free_bytes < 0 else free_bytes
    if free < need:
        raise ValueError(f"run_dir {run_dir} has {free / 2**30:.2f} GiB free, but one checkpoint "
                         f"of {num_parameters:,} parameters needs about {need / 2**30:.2f} GiB; "
                         "free some space or choose another run_dir")
