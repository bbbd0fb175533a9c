"""Saving a run's state into a checkpoint, and choosing, checking and restoring the one a
resumed run continues from (the directory's format is checkpoint.py's).

A resumed run continues bit for bit: the weights, Adam's moments, the EMA and every process's
random generators are in the checkpoint, and everything else a step draws is a function of the
step (train_step.py). The step count of consecutive skipped steps is not saved: a run stopped for
diverging is resumed with a lower learning rate, and must not inherit the streak.

RUN/export holds the EMA weights of the newest checkpoint, written after it: its
model.safetensors is byte for byte the checkpoint's ema.safetensors (the same tensors through
the same writer), so the seal's SHA-256 tells whether the export is up to date. A kill or a
full disk between the two leaves it stale; a resume writes it again.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from torch import Tensor, nn

from ..files import (
    atomic_write_text,
    check_shapes,
    fsync_directory,
    read_tensors,
    safetensors_shapes,
    write_safetensors,
)
from .checkpoint import (
    MARKER,
    CheckpointError,
    check_file,
    checkpoint_dirs,
    checkpoint_path,
    checkpoint_problem,
    checkpoint_step,
    is_checkpoint_name,
    nonfinite_parameter,
    prune_checkpoints,
    seal,
    sealed_files,
    sha256,
    unsealed_files,
)
from .config import RunConfig
from .distributed import agree
from .ema import EMA
from .errors import SetupError, TrainingError, naming
from .optimizer_state import (
    check_optimizer_json,
    optimizer_from_files,
    optimizer_to_files,
    restore_rng,
    rng_from_files,
    rng_to_files,
)

T = TypeVar("T")


@dataclass
class CheckpointState:
    """A checkpoint read into memory and checked, not yet applied to a model."""

    path: Path
    step: int
    skipped_steps: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict
    rng: dict | None  # this process's generators; None if the run had fewer processes


def save_checkpoint(
    accelerator, model: nn.Module, optimizer, ema: EMA, state: dict, run_dir: Path, keep: int,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNNN (state["step"]) under a temporary name, seal it,
    rename it, prune the old ones and refresh the EMA export. A failed write (a full disk)
    stops every process with a TrainingError that names the file and says what is kept: before
    the rename, the checkpoint's temporary files are removed; after it, the checkpoint stays
    and the next resume writes the export again."""
    for what, weights in (("weights", model), ("EMA weights", ema.model)):
        bad = nonfinite_parameter(weights)
        if bad:  # never replace a good checkpoint with a poisoned one
            raise TrainingError(f"the {what} hold NaN or inf ({bad}) at step {state['step']}; "
                                "not saving a checkpoint")
    final = checkpoint_path(run_dir, state["step"])
    root, tmp = final.parent, final.parent / f".{final.name}.tmp"
    main = accelerator.is_main_process
    error: OSError | None = None
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    accelerator.wait_for_everyone()
    try:  # every process its own generators; the main process the rest
        write_files(tmp, f"rng_{accelerator.process_index}", *rng_to_files())
        if main:
            for name, weights in (("model", model), ("ema", ema.model)):
                with naming(tmp / f"{name}.safetensors"):
                    write_safetensors(tmp / f"{name}.safetensors", weights.state_dict())
            write_files(tmp, "optimizer", *optimizer_to_files(optimizer.state_dict()))
            with naming(tmp / "trainer_state.json"):
                atomic_write_text(tmp / "trainer_state.json", json.dumps(state))
    except OSError as e:
        error = error or e
    failed = agree(accelerator, error is not None)[0]  # every process learns of any failure
    if main and not failed:
        try:
            with naming(tmp / MARKER):
                seal(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except OSError as e:
            error = e
    if agree(accelerator, error is not None)[0]:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = error or "a write failed on another process"
        previous = [d.name for d in checkpoint_dirs(run_dir)
                    if d != final and checkpoint_problem(d, hashes=False) is None]
        kept = f"{previous[-1]} is the newest checkpoint" if previous else "no checkpoint yet"
        raise TrainingError(f"could not write checkpoint {final}: {why}; removed its temporary "
                            f"files ({kept}). Free some space and continue with resume=auto")
    # The checkpoint is in place: from here a failure keeps it, and says so.
    steps = {"syncing its folder": lambda: fsync_directory(root),
             "pruning older checkpoints": lambda: prune_checkpoints(run_dir, keep),
             "refreshing the export": lambda: write_export(ema, run_dir)}
    for step_name, act in steps.items() if main else ():
        try:
            act()
        except OSError as e:
            error = OSError(f"{step_name} failed: {e}")
            break
    if agree(accelerator, error is not None)[0]:
        why = error or "a write failed on another process"
        raise TrainingError(f"checkpoint {final} is saved, but {why}. Free some space and "
                            "continue with resume=auto, which writes the export again")
    return final


def write_export(ema: EMA, run_dir: Path) -> None:
    """RUN/export: the EMA weights for sample.py, evaluate.py and the Hub."""
    with naming(run_dir / "export"):
        ema.model.save_pretrained(run_dir / "export")


def export_problem(run_dir: Path, checkpoint: Path | None = None) -> str | None:
    """Why RUN/export does not hold the EMA weights of `checkpoint` (by default the newest
    complete one), or None when it does or there is no checkpoint."""
    if checkpoint is None:
        complete = [d for d in checkpoint_dirs(run_dir) if checkpoint_problem(d, False) is None]
        if not complete:
            return None
        checkpoint = complete[-1]
    export = Path(run_dir) / "export"
    weights = export / "model.safetensors"
    if not (export / "config.json").is_file() or not weights.is_file():
        return f"{export} is missing or incomplete"
    try:
        expected = sealed_files(checkpoint)["ema.safetensors"]["sha256"]
    except CheckpointError as e:
        return f"{checkpoint} cannot be compared with it ({e})"
    if sha256(weights) != expected:
        return f"{weights} is not the EMA weights of {checkpoint.name} (stale)"
    return None


def write_files(directory: Path, stem: str, tensors: dict[str, Tensor], info: dict) -> None:
    """STEM.safetensors and STEM.json: the tensors and the rest of one state."""
    with naming(directory / f"{stem}.safetensors"):
        write_safetensors(directory / f"{stem}.safetensors", tensors)
    with naming(directory / f"{stem}.json"):
        atomic_write_text(directory / f"{stem}.json", json.dumps(info, allow_nan=False))


def read_checkpoint(directory: Path, like: nn.Module, rank: int = 0) -> CheckpointState:
    """Check every file of a checkpoint against its seal and read it, checked against the shapes
    of `like` (the run's model; one on the meta device will do) and, for Adam's settings, against
    the optimizer this run builds from `t`. Raises CheckpointError for anything damaged or
    hostile, and SetupError for a checkpoint of another model configuration."""
    files = sealed_files(directory)
    for name, entry in files.items():
        check_file(directory, name, entry)
    trainer = read_json(directory / "trainer_state.json")
    step, skipped = trainer.get("step"), trainer.get("skipped_steps")
    if not (type(step) is int and step == checkpoint_step(directory)
            and type(skipped) is int and skipped >= 0):
        raise CheckpointError(f"trainer_state.json does not hold step {checkpoint_step(directory)}"
                              " and a count of skipped steps")
    shapes = {k: tuple(v.shape) for k, v in like.state_dict().items()}
    model = checked("model.safetensors", lambda: read_weights(directory / "model.safetensors",
                                                              shapes))
    ema = checked("ema.safetensors", lambda: read_weights(directory / "ema.safetensors", shapes))
    moments = checked("optimizer.safetensors",
                      lambda: read_tensors(directory / "optimizer.safetensors"))
    settings = read_json(directory / "optimizer.json")
    parameters = [tuple(p.shape) for p in like.parameters()]
    checked("optimizer.json", lambda: check_optimizer_json(settings, len(parameters)))
    optimizer = checked("optimizer.safetensors", lambda: optimizer_from_files(
        moments, settings, parameters))
    rng = None
    if f"rng_{rank}.json" in files and f"rng_{rank}.safetensors" in files:
        generators = checked(f"rng_{rank}.safetensors",
                             lambda: read_tensors(directory / f"rng_{rank}.safetensors"))
        rng = checked(f"rng_{rank} state", lambda: rng_from_files(
            generators, read_json(directory / f"rng_{rank}.json")))
    return CheckpointState(directory, step, skipped, model, ema, optimizer, rng)


def read_weights(file: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """A checkpoint's weights; a checkpoint of another model configuration (no earlier one of
    the run would fit either) is a SetupError, not damage to fall back from."""
    safetensors_shapes(file)  # a damaged header is damage
    try:
        check_shapes(file, shapes)
    except ValueError as e:
        raise SetupError(str(e)) from None
    return read_tensors(file)


def checked(name: str, read: Callable[[], T]) -> T:
    """`read()`, its ValueError turned into a CheckpointError that names the file."""
    try:
        return read()
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None


def read_json(file: Path) -> dict:
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


def restore(checkpoint: CheckpointState, model: nn.Module, optimizer, ema: EMA) -> dict:
    """Load a read checkpoint into the run's objects; returns the trainer state to go on with."""
    model.load_state_dict(checkpoint.model)
    ema.model.load_state_dict(checkpoint.ema)
    optimizer.load_state_dict(checkpoint.optimizer)
    if checkpoint.rng is not None:
        restore_rng(checkpoint.rng)
    return {"step": checkpoint.step, "skipped_steps": checkpoint.skipped_steps}


def select_checkpoint(cfg: RunConfig, like: nn.Module, rank: int, warn: bool
                      ) -> CheckpointState | None:
    """The checkpoint to continue from, read and checked, or None for a fresh start.

    resume=auto takes the newest checkpoint in run_dir that passes every check, naming each
    newer one that fails; resume=PATH takes PATH or stops with why it cannot; resume="" refuses
    a run_dir that already holds checkpoints.
    """
    if cfg.resume == "auto":
        for directory in reversed(checkpoint_dirs(cfg.run_dir)):
            try:
                checkpoint = read_checkpoint(directory, like, rank)
            except CheckpointError as e:
                if warn:
                    print(f"warning: skipping checkpoint {directory}: {e}; trying the previous "
                          "one", file=sys.stderr)
                continue
            if warn:
                warn_unsealed(directory)
            return checkpoint
        return None
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.is_dir() or not is_checkpoint_name(path.name):
            raise SetupError(f"resume={cfg.resume}: not a checkpoint directory "
                             f"(expected {Path(cfg.run_dir) / 'checkpoints' / 'step_NNNNNNN'})")
        try:
            checkpoint = read_checkpoint(path, like, rank)
        except CheckpointError as e:
            raise SetupError(f"resume={cfg.resume}: {e}") from None
        if warn:
            warn_unsealed(path)
        return checkpoint
    existing = checkpoint_dirs(cfg.run_dir)
    if existing:
        raise SetupError(f"{cfg.run_dir} already holds checkpoints ({existing[-1].name}); pass "
                         "resume=auto to continue that run, or choose another run_dir")
    return None


def warn_unsealed(directory: Path) -> None:
    extra = unsealed_files(directory)
    if extra:
        print(f"warning: {directory} holds {', '.join(extra)}, not part of the checkpoint (not "
              f"listed in its seal); never read", file=sys.stderr)
