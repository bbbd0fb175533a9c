"""A checkpoint directory that a crash cannot corrupt unnoticed, and the EMA model read from a
run, a checkpoint or an export.

RUN/checkpoints/step_NNNNNNN/ holds only safetensors and JSON (never a pickle):

    model.safetensors      the live weights          ema.safetensors     the EMA weights
    optimizer.safetensors  Adam's moments and steps  optimizer.json      its hyper-parameters
    trainer_state.json     step, skipped steps       rng_R.safetensors   process R's generators
    rng_R.json             (Python's and numpy's)    complete.json       the seal, written last

It is written under a temporary name, every file fsynced, then sealed: complete.json lists every
file with its size and SHA-256, and only then is the directory renamed. A checkpoint is resumed
only when its seal lists every file it needs and each still has its size and hash, so a torn
write, a truncated file or bytes rotted in place are caught, named, and the previous checkpoint
used instead (resume.py). A file the seal does not list is never opened.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from ..files import atomic_write_text, check_shapes, read_tensors
from ..hub import is_hub_id
from ..model.transformer import AxialTransformer
from ..model.video import build_model
from .config import RunConfig, config_from_dict
from .ema import EMA
from .errors import CheckpointError

CHECKPOINT_PREFIX = "step_"
MARKER = "complete.json"
# Process 0's generators are always there; a run of N processes adds rng_1 .. rng_{N-1}.
REQUIRED = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
            "trainer_state.json", "rng_0.safetensors", "rng_0.json")
_RNG_FILE = re.compile(r"rng_\d+\.(safetensors|json)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every RUN/checkpoints/step_NNNNNNN directory, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_checkpoint_name(p.name))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints whose seal and sizes are intact, oldest first (no hashes: a quick look)."""
    return [d for d in checkpoint_dirs(run_dir) if checkpoint_problem(d, hashes=False) is None]


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()


def checkpoint_step(directory: Path) -> int:
    return int(directory.name[len(CHECKPOINT_PREFIX):])


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def seal(directory: Path) -> None:
    """Write the marker of a checkpoint whose files are all written and fsynced."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != MARKER}
    atomic_write_text(directory / MARKER, json.dumps({"files": files}, indent=1))


def read_json(file: Path) -> dict:
    """A checkpoint's JSON object; anything else is a CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file.name} is not JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{file.name} is nested too deeply (expected a flat JSON object)"
                              ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file.name} does not hold a JSON object")
    return value


def sealed_files(directory: Path) -> dict[str, dict]:
    """The marker's {name: {"bytes", "sha256"}}, checked for form; raises CheckpointError."""
    if not (directory / MARKER).is_file():
        raise CheckpointError(f"no {MARKER} marker (the write did not finish)")
    files = read_json(directory / MARKER).get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{MARKER} lists no files")
    for name, entry in files.items():
        if name not in REQUIRED and not _RNG_FILE.fullmatch(name):
            raise CheckpointError(f"{MARKER} lists {name!r}, which is no checkpoint file")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise CheckpointError(f"{MARKER} gives no size and SHA-256 for {name} (a checkpoint "
                                  "of an older version, which stored pickles: not resumable)")
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"{MARKER} does not list {missing[0]}")
    return files


def check_file(directory: Path, name: str, entry: dict, hashes: bool = True) -> None:
    """Raise CheckpointError unless `name` has the size (and SHA-256) the marker gives."""
    file = directory / name
    if not file.is_file():
        raise CheckpointError(f"{name} is missing")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{name} has {size} bytes, {MARKER} says {entry['bytes']} "
                              "(truncated?)")
    if hashes and sha256(file) != entry["sha256"]:
        raise CheckpointError(f"{name} does not match its SHA-256 in {MARKER} (corrupted)")


def checkpoint_problem(directory: Path, hashes: bool = True) -> str | None:
    """Why `directory` cannot be resumed from (no marker, a file missing, truncated or changed
    since it was sealed), or None. `hashes=False` checks sizes only, for a quick look."""
    try:
        for name, entry in sealed_files(directory).items():
            check_file(directory, name, entry, hashes)
    except CheckpointError as e:
        return str(e)
    return None


def unsealed_files(directory: Path) -> list[str]:
    """Files in a checkpoint that its marker does not list: never read, named in a warning."""
    try:
        listed = set(sealed_files(directory)) | {MARKER}
    except CheckpointError:
        return []
    return sorted(p.name for p in directory.iterdir() if p.name not in listed)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and broken ones older than the
    newest complete one (none while no checkpoint is complete). Returns what went."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return []
    doomed = [d for d in checkpoint_dirs(run_dir)
              if d not in complete[-keep:] and d.name < complete[-1].name]
    for directory in doomed:
        shutil.rmtree(directory)
    return doomed


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()),
                None)


# ---------------------------------------------------------------------------------------------
# The trained model, for sampling and evaluation.


def run_config(run_dir: Path) -> RunConfig | None:
    """The config.yaml of a run, or None if it has none."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:  # safe_load: a YAML tag never constructs a Python object
        return config_from_dict(yaml.safe_load(saved.read_text()))
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())
        raise ValueError(f"{saved}: not a run config this version can read ({problem})") from None


def load_trained_model(path: str | Path) -> tuple[nn.Module, RunConfig | None]:
    """The EMA model (an AxialTransformer, or a VideoTransformer for a video run) of a run
    directory, one of its checkpoints, an export directory or a Hub repository id
    ("owner/name"), with the run's config when there is one (for its data spec)."""
    if is_hub_id(str(path)):
        return AxialTransformer.from_pretrained(str(path)), None
    path = Path(path)
    if not path.exists():
        names = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
        hint = f" (did you mean {path.parent / close[0]}?)" if close else ""
        raise FileNotFoundError(f"{path} does not exist{hint}")
    if (path / "config.json").is_file():  # an export: RUN/export or a copy of one
        return AxialTransformer.from_pretrained(path), run_config(path.parent)
    if (path / "trainer_state.json").is_file():  # RUN/checkpoints/step_NNNNNNN
        cfg = run_config(path.parent.parent)
        if cfg is None:
            raise FileNotFoundError(f"{path.parent.parent / 'config.yaml'} not found: a "
                                    "checkpoint is read with its run's config")
        file = path / "ema.safetensors"
        try:  # unsealed, or sealed by an older version: no hash to check
            entry = sealed_files(path)[file.name]
        except CheckpointError:
            entry = None
        try:  # what was sealed must still be there
            if entry is not None:
                check_file(path, file.name, entry)
        except CheckpointError as e:
            raise ValueError(f"{path}: {e}") from None
        # Checked before the model is built: the file bounds what its config may allocate.
        model_class = AxialTransformer.model_class_for(cfg.model)  # or VideoTransformer
        check_shapes(file, model_class.parameter_shapes(cfg.model))
        ema = EMA(build_model(cfg.model), cfg.train.ema_decay)
        try:
            ema.model.load_state_dict(read_tensors(file))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        return ema.model, cfg
    if (path / "export" / "config.json").is_file():  # a run directory
        return AxialTransformer.from_pretrained(path / "export"), run_config(path)
    if (path / "config.yaml").is_file():  # a run that has not exported yet
        raise FileNotFoundError(f"{path}: a run with no export yet; training writes export/ "
                                "with each checkpoint (every checkpoint.every steps) and at the "
                                "end")
    raise FileNotFoundError(f"{path}: expected a run directory, one of its checkpoints "
                            "(checkpoints/step_NNNNNNN), an export (config.json + "
                            "model.safetensors) or a Hub repository id (owner/name)")
