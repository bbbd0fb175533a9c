"""The training run's configuration: nested dataclasses, YAML presets and dotted overrides.

    cfg = load_config("configs/imagenet32.yaml", ["train.lr=2e-4", "model.dropout=0.0"])

A YAML file sets fields over the dataclass defaults; each `section.key=value` override then sets
one field. Values are parsed as YAML (`true`, `1e-4`, `[32, 32]`) and checked against the field's
type, so a typo or a wrong type fails at start-up with the key's name instead of hours later.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..model.config import AxialTransformerConfig, with_preset


@dataclass
class DataConfig:
    # "builtin" (photo crops shipped with scikit-image / scikit-learn, no download), a prepared
    # uint8 .npy [N, H, W, C], or a directory holding train.npy and test.npy. The image size and
    # channels are the model's (model.image_size, model.channels).
    spec: str = "builtin"
    # DataLoader worker processes; the prepared arrays are memory-mapped, so 0-4 is plenty.
    workers: int = 0


@dataclass
class OptimConfig:
    # Optimizer steps to train for.
    steps: int = 2000
    # Images per optimizer step across all processes and accumulation steps (the paper: 64), so
    # a config means the same run on any number of GPUs.
    batch_size: int = 16
    # Adam learning rate after warm-up (the paper: 1e-4 on ImageNet-32, 2e-4 on ImageNet-64).
    lr: float = 1e-4
    # Steps of linear warm-up from 0 (the paper: 5000).
    warmup_steps: int = 100
    # "constant" after warm-up as in the paper, or "cosine" decay to min_lr at the last step.
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    # Adam betas (the paper: 0.9, 0.999) and weight decay (none in the paper).
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    # Clip the global gradient norm to this (the paper: 1.0); 0 turns clipping off.
    grad_clip: float = 1.0
    # EMA of the weights, used for evaluation and samples (the paper: 0.99995). It warms up as
    # min(ema_decay, (1 + t) / (10 + t)) so that short runs average recent weights, not the init.
    ema_decay: float = 0.99995
    # "random": the official objective, one random channel per image (unbiased, 1/C the compute);
    # "all": every channel of every image.
    objective: Literal["random", "all"] = "random"
    # Micro-batches whose gradients are summed per optimizer step.
    grad_accumulation: int = 1
    # A step whose loss or gradient is not finite (NaN, inf) is skipped on every process; this
    # many skipped in a row stop the run (the model has diverged; a lower lr is needed).
    max_skipped_steps: int = 10
    # "auto": bf16 autocast where the device multiplies bf16 fast (a CUDA GPU that supports it,
    # a CPU with AVX512-BF16 or AMX or whose bf16 matmuls measure faster), else fp32; the run's
    # first line says which and why. "bf16" or "no" (fp32) force one (precision.py).
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # CPU threads of torch's ops (torch.set_num_threads; 0: torch's own default, one per core or
    # OMP_NUM_THREADS). One, as torchrun also sets: the demo's small ops gain little from a
    # second thread on an idle 2-core CPU, and threads waiting on each other lose most of their
    # speed when other processes share the cores (docs/training.md).
    threads: int = 1
    # torch.compile the training forward pass (pays off on GPU for long runs).
    compile: bool = False
    seed: int = 0
    # Class-conditional models (model.num_classes > 0): the share of training images shown with
    # "no class" instead of their label, so that one model is conditional and unconditional and
    # can sample with classifier-free guidance (0: conditional only; Ho and Salimans use 0.1-0.2).
    label_dropout: float = 0.0


@dataclass
class EvalConfig:
    # Evaluate the EMA model on the whole test split every this many steps (0: only at the end).
    every: int = 1000
    # Images per forward pass on each process.
    batch_size: int = 32
    # Score only the first this many test images (0: all). For quick checks, never for results.
    max_images: int = 0
    # Evaluate under bf16 autocast instead of fp32 (the default, for exact numbers).
    bf16: bool = False
    # At the end, write RUN/heatmap.png: bits per pixel averaged over the test split.
    heatmap: bool = False
    # At the end, print the bits/dim that PNG and WebP lossless spend on the same test images.
    baselines: bool = False


@dataclass
class LogConfig:
    # Print and append training metrics to RUN/metrics.jsonl every this many steps.
    every: int = 50
    # Also log to Weights & Biases (respects WANDB_MODE=offline / disabled).
    wandb: bool = False
    wandb_project: str = "axial-transformer"
    # Save an EMA sample grid to RUN/samples/ every this many steps (0: never; a grid is also
    # drawn at the end when nonzero).
    sample_every: int = 0
    num_samples: int = 16


@dataclass
class CheckpointConfig:
    # Save a resumable checkpoint and the EMA export every this many steps (0: only at the end).
    every: int = 1000
    # Checkpoints to keep; older ones are deleted (never the only complete one).
    keep: int = 2


@dataclass
class DebugConfig:
    # Fault injection for the tests of preemption, resume and divergence; all off by default.
    # Steps count from 1 as in metrics.jsonl; the faults hit process `rank` (-1: every process).
    rank: int = -1
    # Kill the process with SIGKILL right after this step (0: never), as a preemption without
    # warning would.
    kill_at_step: int = 0
    # Send SIGTERM to the process right after this step (0: never), as a scheduler would.
    sigterm_at_step: int = 0
    # Make the loss NaN at these steps.
    nan_at_steps: tuple[int, ...] = ()
    # Pretend the disk holding run_dir has this many bytes free (-1: ask the disk).
    free_bytes: int = -1


@dataclass
class RunConfig:
    model: AxialTransformerConfig = field(default_factory=AxialTransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # Everything the run writes goes here (config.yaml, metrics.jsonl, checkpoints/, export/).
    run_dir: str = "runs/default"
    # "" starts a fresh run, "auto" continues from the latest checkpoint in run_dir if there is
    # one, or a path names a checkpoint directory to continue from.
    resume: str = ""

    def __post_init__(self) -> None:
        t = self.train
        if not 0 < t.lr < math.inf:  # also refuses NaN, for which every comparison is False
            raise ValueError(f"train.lr must be a positive finite number, got {t.lr}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if not 0 <= getattr(t, name) < math.inf:
                raise ValueError(f"train.{name} must be a finite number >= 0, got "
                                 f"{getattr(t, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
        if not 0 <= t.seed < 2**32:  # numpy's and Accelerate's seeding take no other
            raise ValueError(f"train.seed must be in [0, 2**32), got {t.seed}")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if not 0.0 <= t.label_dropout < 1.0:
            raise ValueError(f"train.label_dropout must be in [0, 1), got {t.label_dropout}")
        if t.label_dropout and not self.model.num_classes:
            raise ValueError("train.label_dropout needs a class-conditional model: set "
                             "model.num_classes to the number of classes in the data")
        for key, minimum in _MINIMUMS.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value < minimum:
                raise ValueError(f"{key} must be at least {minimum}, got {value}")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


# Integer fields with a lower bound (0 means "off" or "all" where allowed).
_MINIMUMS = {
    "train.steps": 1, "train.batch_size": 1, "train.grad_accumulation": 1,
    "train.warmup_steps": 0, "train.threads": 0, "data.workers": 0,
    "eval.every": 0, "eval.batch_size": 1, "eval.max_images": 0,
    "log.every": 1, "log.sample_every": 0, "log.num_samples": 1,
    "checkpoint.every": 0, "checkpoint.keep": 1, "train.max_skipped_steps": 1,
    "debug.kill_at_step": 0, "debug.sigterm_at_step": 0,
}


def _plain(value: Any) -> Any:
    """Tuples become lists so that the YAML dump is plain and loads back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Building a config from YAML and overrides, with type checks.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (e.g. int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    error = ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__})")
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as False: give it back as the word when that is a choice.
        if isinstance(value, bool) and {False: "no", True: "yes"}[value] in args:
            value = {False: "no", True: "yes"}[value]
        if value not in args:
            raise error
        return value
    if origin is tuple and args[-1:] == (Ellipsis,):  # tuple[int, ...]: any length
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, v, args[0]) for v in value)
    if origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool) and set(args) == {int}:
            value = [value] * len(args)  # image_size=32 means 32 x 32
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise error
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise error
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any spelling float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise error from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error
        return value
    raise TypeError(f"{key}: unsupported field type {tp}")


def _suggest(name: str, choices: list[str] | set[str], prefix: str = "") -> str:
    """" (did you mean PREFIX+X?)" when `name` looks like a typo of X in `choices`, else ""."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, "
                         f"got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix}{key!s}"
                             f"{_suggest(str(key), names, prefix)}; "
                             f"{prefix.rstrip('.') or 'the top level'} has {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    try:
        return cls(**kwargs)
    except ValueError as e:
        if not prefix:
            raise
        raise ValueError(f"{prefix.rstrip('.')}: {e}") from None


def _set_dotted(tree: dict, cls: type, dotted: str, raw: str) -> None:
    """Apply one `a.b=value` override to the nested dict `tree`, checking the key exists."""
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node_cls)}
        where = ".".join(parts[:i]) or "the top level"
        if part not in names:
            hint = _suggest(part, names, "".join(f"{p}." for p in parts[:i]))
            raise ValueError(f"unknown config key {dotted!r}{hint}: {where} has "
                             f"{', '.join(sorted(names))}")
        tp = typing.get_type_hints(node_cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"{dotted} is a section; set one of its keys, e.g. "
                                 f"{dotted}.{dataclasses.fields(tp)[0].name}=...")
            # Strings are taken verbatim so that a path like "data/123" or "1e-4" stays a string.
            node[part] = raw if tp is str else yaml.safe_load(raw)
            return
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"unknown config key {dotted!r}: {'.'.join(parts[:i + 1])} is a "
                             f"{_type_name(tp)}, not a section")
        node = node.setdefault(part, {})
        node_cls = tp


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at `path`, then each `section.key=value` override."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a YAML mapping of sections, got {type(tree)}")
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(tree, RunConfig, key.strip(), raw.strip())
    if isinstance(tree.get("model"), dict):  # `preset: NAME` and the settings that differ
        tree["model"] = with_preset(tree["model"])
    return _build(RunConfig, tree)


def config_from_dict(tree: dict) -> RunConfig:
    """Rebuild a RunConfig from its `to_dict()` (e.g. a run's saved config.yaml)."""
    return _build(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from ..files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
