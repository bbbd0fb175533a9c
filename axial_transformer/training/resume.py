"""Saving a run's state into a checkpoint (checkpoint.py: the format), and choosing, checking and
restoring the one a resumed run continues from, bit for bit: everything else a step draws is a
function of the step (step.py).

RUN/export holds the EMA weights of the newest checkpoint, written after it: its
model.safetensors is byte for byte the checkpoint's ema.safetensors (the same tensors through
the same writer), so the seal's SHA-256 tells whether the export is up to date.
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
from . import checkpoint as ckpt
from . import optimizer_state
from .config import RunConfig
from .distributed import agree
from .ema import EMA
from .errors import CheckpointError, SetupError, TrainingError, naming

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


def first_error(*actions: Callable[[], object]) -> OSError | None:
    """Call `actions` in turn up to the first OSError, which is returned."""
    for action in actions:
        try:
            action()
        except OSError as e:
            return e
    return None


def save_checkpoint(
    accelerator, model: nn.Module, optimizer, ema: EMA, state: dict, run_dir: Path, keep: int,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNNN under a temporary name, seal it, rename it, prune the
    old ones and refresh the export. A failed write stops every process with a TrainingError
    that says what is kept: before the rename nothing, after it the checkpoint."""
    for what, weights in (("weights", model), ("EMA weights", ema.model)):
        bad = ckpt.nonfinite_parameter(weights)
        if bad:  # never replace a good checkpoint with a poisoned one
            raise TrainingError(f"the {what} hold NaN or inf ({bad}) at step {state['step']}; "
                                "not saving a checkpoint")
    final = ckpt.checkpoint_path(run_dir, state["step"])
    tmp, main = final.parent / f".{final.name}.tmp", accelerator.is_main_process

    def write(name: str, data: dict[str, Tensor] | str) -> None:
        with naming(tmp / name):
            (atomic_write_text if isinstance(data, str) else write_safetensors)(tmp / name, data)

    def write_parts(stem: str, tensors: dict[str, Tensor], info: dict) -> None:
        write(f"{stem}.safetensors", tensors)
        write(f"{stem}.json", json.dumps(info, allow_nan=False))

    def write_state() -> None:  # every process its own generators; the main process the rest
        write_parts(f"rng_{accelerator.process_index}", *optimizer_state.rng_to_files())
        if main:
            write("model.safetensors", model.state_dict())
            write("ema.safetensors", ema.model.state_dict())
            write_parts("optimizer", *optimizer_state.optimizer_to_files(optimizer.state_dict()))
            write("trainer_state.json", json.dumps(state))

    def seal_and_rename() -> None:
        with naming(tmp / ckpt.MARKER):
            ckpt.seal(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    error = first_error(lambda: shutil.rmtree(tmp, ignore_errors=True),
                        lambda: tmp.mkdir(parents=True)) if main else None
    accelerator.wait_for_everyone()
    error = error or first_error(write_state)
    failed = agree(accelerator, error is not None)[0]  # every process learns of any failure
    if main and not failed:
        error = first_error(seal_and_rename)
    if agree(accelerator, error is not None)[0]:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [d.name for d in ckpt.complete_checkpoints(run_dir) if d != final]
        kept = f"{previous[-1]} is the newest checkpoint" if previous else "no checkpoint yet"
        raise TrainingError(f"could not write checkpoint {final}: "
                            f"{error or 'a write failed on another process'}; removed its "
                            f"temporary files ({kept}). Free some space and continue with "
                            "resume=auto")
    # The checkpoint is in place: from here a failure keeps it, and says so.
    steps = {"syncing its folder": lambda: fsync_directory(final.parent),
             "pruning older checkpoints": lambda: ckpt.prune_checkpoints(run_dir, keep),
             "refreshing the export": lambda: write_export(ema, run_dir)}
    for step_name, action in steps.items() if main else ():
        if (e := first_error(action)) is not None:
            error = OSError(f"{step_name} failed: {e}")
            break
    if agree(accelerator, error is not None)[0]:
        raise TrainingError(f"checkpoint {final} is saved, but "
                            f"{error or 'a write failed on another process'}. Free some space "
                            "and continue with resume=auto, which writes the export again")
    return final


def write_export(ema: EMA, run_dir: Path) -> None:
    """RUN/export: the EMA weights for sample.py, evaluate.py and the Hub."""
    with naming(run_dir / "export"):
        ema.model.save_pretrained(run_dir / "export")


def export_problem(run_dir: Path, checkpoint: Path | None = None) -> str | None:
    """Why RUN/export does not hold the EMA weights of `checkpoint` (by default the newest
    complete one), or None when it does or there is no checkpoint."""
    checkpoint = checkpoint or next(reversed(ckpt.complete_checkpoints(run_dir)), None)
    if checkpoint is None:
        return None
    export = Path(run_dir) / "export"
    weights = export / "model.safetensors"
    if not (export / "config.json").is_file() or not weights.is_file():
        return f"{export} is missing or incomplete"
    try:
        expected = ckpt.sealed_files(checkpoint)["ema.safetensors"]["sha256"]
    except CheckpointError as e:
        return f"{checkpoint} cannot be compared with it ({e})"
    if ckpt.sha256(weights) != expected:
        return f"{weights} is not the EMA weights of {checkpoint.name} (stale)"
    return None


def checked(name: str, read: Callable[[], T]) -> T:
    """`read()`, its ValueError turned into a CheckpointError that names the file."""
    try:
        return read()
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None


def read_weights(file: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """A checkpoint's weights; a checkpoint of another model configuration (no earlier one of
    the run would fit either) is a SetupError, not damage to fall back from."""
    checked(file.name, lambda: safetensors_shapes(file))  # a damaged header is damage
    try:
        check_shapes(file, shapes)
    except ValueError as e:
        raise SetupError(str(e)) from None
    return checked(file.name, lambda: read_tensors(file))


def read_checkpoint(directory: Path, like: nn.Module, rank: int = 0) -> CheckpointState:
    """Every file of a checkpoint, checked against its seal, the shapes of `like` (the run's
    model, or one on the meta device) and the run's Adam. Raises CheckpointError for anything
    damaged or hostile, SetupError for a checkpoint of another model configuration."""
    files = ckpt.sealed_files(directory)
    for name, entry in files.items():
        ckpt.check_file(directory, name, entry)
    trainer = ckpt.read_json(directory / "trainer_state.json")
    step, skipped = trainer.get("step"), trainer.get("skipped_steps")
    if not (type(step) is int and step == ckpt.checkpoint_step(directory)
            and type(skipped) is int and skipped >= 0):
        raise CheckpointError(f"trainer_state.json does not hold step "
                              f"{ckpt.checkpoint_step(directory)} and a count of skipped steps")
    shapes = {k: tuple(v.shape) for k, v in like.state_dict().items()}
    model, ema = (read_weights(directory / f"{name}.safetensors", shapes)
                  for name in ("model", "ema"))
    moments = checked("optimizer.safetensors",
                      lambda: read_tensors(directory / "optimizer.safetensors"))
    settings = ckpt.read_json(directory / "optimizer.json")
    parameters = [tuple(p.shape) for p in like.parameters()]
    checked("optimizer.json",
            lambda: optimizer_state.check_optimizer_json(settings, len(parameters)))
    optimizer = checked("optimizer.safetensors", lambda: optimizer_state.optimizer_from_files(
        moments, settings, parameters))
    rng = None
    if f"rng_{rank}.json" in files and f"rng_{rank}.safetensors" in files:
        generators = checked(f"rng_{rank}.safetensors",
                             lambda: read_tensors(directory / f"rng_{rank}.safetensors"))
        rng = checked(f"rng_{rank} state", lambda: optimizer_state.rng_from_files(
            generators, ckpt.read_json(directory / f"rng_{rank}.json")))
    return CheckpointState(directory, step, skipped, model, ema, optimizer, rng)


def restore(checkpoint: CheckpointState, model: nn.Module, optimizer, ema: EMA) -> dict:
    """Load a read checkpoint into the run's objects; returns the trainer state to go on with."""
    model.load_state_dict(checkpoint.model)
    ema.model.load_state_dict(checkpoint.ema)
    optimizer.load_state_dict(checkpoint.optimizer)
    if checkpoint.rng is not None:
        optimizer_state.restore_rng(checkpoint.rng)
    return {"step": checkpoint.step, "skipped_steps": checkpoint.skipped_steps}


def select_checkpoint(cfg: RunConfig, like: nn.Module, rank: int, warn: bool
                      ) -> CheckpointState | None:
    """The checkpoint to continue from, read and checked, or None for a fresh start: with
    resume=auto the newest that passes every check (each newer one named), resume=PATH that
    one or why not; resume="" refuses a run_dir that already holds checkpoints."""
    if cfg.resume == "auto":
        for directory in reversed(ckpt.checkpoint_dirs(cfg.run_dir)):
            try:
                checkpoint = read_checkpoint(directory, like, rank)
            except CheckpointError as e:
                if warn:
                    print(f"warning: skipping checkpoint {directory}: {e}; trying the previous "
                          "one", file=sys.stderr)
                continue
            return warn_unsealed(checkpoint, warn)
        return None
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.is_dir() or not ckpt.is_checkpoint_name(path.name):
            raise SetupError(f"resume={cfg.resume}: not a checkpoint directory "
                             f"(expected {Path(cfg.run_dir) / 'checkpoints' / 'step_NNNNNNN'})")
        try:
            return warn_unsealed(read_checkpoint(path, like, rank), warn)
        except CheckpointError as e:
            raise SetupError(f"resume={cfg.resume}: {e}") from None
    existing = ckpt.checkpoint_dirs(cfg.run_dir)
    if existing:
        raise SetupError(f"{cfg.run_dir} already holds checkpoints ({existing[-1].name}); pass "
                         "resume=auto to continue that run, or choose another run_dir")
    return None


def warn_unsealed(checkpoint: CheckpointState, warn: bool) -> CheckpointState:
    extra = ckpt.unsealed_files(checkpoint.path) if warn else []
    if extra:
        print(f"warning: {checkpoint.path} holds {', '.join(extra)}, not part of the checkpoint "
              "(not listed in its seal); never read", file=sys.stderr)
    return checkpoint
