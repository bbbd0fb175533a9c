"""The training run's configuration: nested dataclasses, YAML presets and dotted overrides.

    cfg = load_config("configs/imagenet32.yaml", ["train.lr=2e-4", "model.dropout=0.0"])

A YAML file sets fields over the dataclass defaults; each `section.key=value` override then sets
one field. Values are parsed as YAML (`true`, `1e-4`, `[32, 32]`) and checked against the field's
type, so a typo or a wrong type fails at start-up with the key's name instead of hours later.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..model.config import AxialTransformerConfig, is_int, with_preset, without_run_time_keys


@dataclass
class DataConfig:
    # "builtin" (photo crops shipped with scikit-image / scikit-learn, no download), a prepared
    # uint8 .npy [N, H, W, C], or a directory holding train.npy and test.npy. The image size and
    # channels are the model's (model.image_size, model.channels).
    spec: str = "builtin"
    workers: int = 0  # DataLoader workers; the arrays are memory-mapped, so 0-4 is plenty


@dataclass
class OptimConfig:
    steps: int = 2000  # optimizer steps to train for
    # Images per optimizer step across all processes and accumulation steps (the paper: 64), so
    # a config means the same run on any number of GPUs.
    batch_size: int = 16
    lr: float = 1e-4  # after warm-up (the paper: 1e-4 on ImageNet-32, 2e-4 on ImageNet-64)
    warmup_steps: int = 100  # linear from 0 (the paper: 5000)
    # "constant" after warm-up as in the paper, or "cosine" decay to min_lr at the last step.
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    beta1: float = 0.9  # Adam's betas as in the paper, and no weight decay
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # of the global gradient norm (the paper: 1.0); 0: no clipping
    # EMA of the weights, used for evaluation and samples (the paper: 0.99995). It warms up as
    # min(ema_decay, (1 + t) / (10 + t)) so that short runs average recent weights, not the init.
    ema_decay: float = 0.99995
    # "random": the official objective, one random channel per image (unbiased, 1/C the compute);
    # "all": every channel of every image.
    objective: Literal["random", "all"] = "random"
    grad_accumulation: int = 1  # micro-batches whose gradients are summed per optimizer step
    # A step whose loss or gradient is not finite is skipped on every process; this many in a
    # row stop the run (it has diverged; a lower lr is needed).
    max_skipped_steps: int = 10
    # "auto": bf16 autocast where the device multiplies bf16 fast, else fp32 (precision.py; the
    # run's first line says which and why). "bf16" or "no" (fp32) force one.
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # CPU threads of torch's ops (0: torch's default). One, as torchrun also sets: the demo's
    # small ops gain little from a second, which stalls when other processes share the cores.
    threads: int = 1
    compile: bool = False  # torch.compile the training forward (pays off on GPU for long runs)
    # Recompute each block's activations in the backward pass: needed to fit the paper's
    # ImageNet-64 model on one GPU, costs about a third more compute. A resume may toggle it.
    gradient_checkpointing: bool = False
    seed: int = 0
    # Class-conditional models: the share of training images shown with "no class" instead of
    # their label, so that one model also samples with classifier-free guidance (0: conditional
    # only; Ho and Salimans use 0.1-0.2).
    label_dropout: float = 0.0


@dataclass
class EvalConfig:
    every: int = 1000  # steps between evaluations of the EMA model on the test split (0: end)
    batch_size: int = 32  # images per forward pass on each process
    max_images: int = 0  # score only the first this many test images (0: all; quick checks)
    bf16: bool = False  # under bf16 autocast instead of fp32 (exact numbers)
    heatmap: bool = False  # at the end, RUN/heatmap.png: bits per pixel over the test split
    baselines: bool = False  # at the end, the bits/dim of PNG, WebP and JPEG XL lossless


@dataclass
class LogConfig:
    every: int = 50  # steps between training records (stdout and RUN/metrics.jsonl)
    wandb: bool = False  # also to Weights & Biases (respects WANDB_MODE=offline / disabled)
    wandb_project: str = "axial-transformer"
    sample_every: int = 0  # steps between EMA sample grids in RUN/samples/ (0: never)
    num_samples: int = 16


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints with their EMA export (0: only at the end)
    keep: int = 2  # checkpoints kept; older ones are deleted (never the only complete one)


@dataclass
class RunConfig:
    model: AxialTransformerConfig = field(default_factory=AxialTransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Everything the run writes goes here (config.yaml, metrics.jsonl, checkpoints/, export/).
    run_dir: str = "runs/default"
    # "" starts a fresh run, "auto" continues from the latest checkpoint in run_dir if there is
    # one, or a path names a checkpoint directory to continue from.
    resume: str = ""

    def __post_init__(self) -> None:
        for key, (low, high, what) in RANGES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not low <= value < high:  # also refuses NaN, for which every comparison is False
                raise ValueError(f"{key} must be {what}, got {value}")
        if self.train.label_dropout and not self.model.num_classes:
            raise ValueError("train.label_dropout needs a class-conditional model: set "
                             "model.num_classes to the number of classes in the data")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, for YAML


# The range of each number: low <= value < high.
RANGES = {
    "train.lr": (math.ulp(0.0), math.inf, "a positive finite number"),
    **{key: (0, math.inf, "a finite number >= 0")
       for key in ("train.min_lr", "train.weight_decay", "train.grad_clip")},
    **{key: (0, 1, "in [0, 1)")
       for key in ("train.beta1", "train.beta2", "train.ema_decay", "train.label_dropout")},
    "train.seed": (0, 2**32, "in [0, 2**32)"),  # numpy's and Accelerate's seeding take no other
    # Integers with a lower bound (0 means "off" or "all" where allowed).
    **{key: (low, math.inf, f"at least {low}") for key, low in {
        "train.steps": 1, "train.batch_size": 1, "train.grad_accumulation": 1,
        "train.warmup_steps": 0, "train.threads": 0, "train.max_skipped_steps": 1,
        "data.workers": 0, "eval.every": 0, "eval.batch_size": 1, "eval.max_images": 0,
        "log.every": 1, "log.sample_every": 0, "log.num_samples": 1,
        "checkpoint.every": 0, "checkpoint.keep": 1}.items()},
}
# Keys of older versions, and where they went.
MOVED = {"model.gradient_checkpointing": "now train.gradient_checkpointing",
         "model.attention": "now AxialTransformer.set_attention(), not a config key"}


# ---------------------------------------------------------------------------------------------
# Building a config from YAML and overrides, with type checks.


class Override(str):
    """The text of a `key=value` override: a string field takes it verbatim (a path like
    "data/123" stays a string), any other field parses it as YAML."""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (e.g. int -> float)."""
    if isinstance(value, Override):
        value = str(value) if tp is str else yaml.safe_load(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as False: give it back as the word when that is a choice.
        if isinstance(value, bool) and ("yes" if value else "no") in args:
            value = "yes" if value else "no"
        if value in args:
            return value
    elif origin is tuple:
        if args[-1:] == (Ellipsis,):  # tuple[str, ...]: any length
            value = value if isinstance(value, (list, tuple)) else [value]
            args = args[:1] * len(value)
        elif is_int(value) and set(args) == {int}:
            value = [value] * len(args)  # image_size=32 means 32 x 32
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    elif tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any spelling float() accepts.
        with suppress(ValueError):
            return float(value)
    elif tp is float and (is_int(value) or isinstance(value, float)):
        return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1, cutoff=0.6)
            hint = MOVED.get(f"{prefix}{key}") or (f"did you mean {prefix}{close[0]}?"
                                                   if close else "")
            raise ValueError(f"unknown config key '{prefix}{key}'{f' ({hint})' if hint else ''}"
                             f"; {where} has {', '.join(hints)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as e:
        if not prefix:
            raise
        raise ValueError(f"{where}: {e}") from None


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
        *sections, name = key.strip().split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {section} is not a section")
        node[name] = Override(raw.strip())
    if isinstance(tree.get("model"), dict):  # `preset: NAME` and the settings that differ
        tree["model"] = with_preset(tree["model"])
    return _build(RunConfig, tree)


def config_from_dict(tree: dict) -> RunConfig:
    """Rebuild a RunConfig from its `to_dict()` (e.g. a run's saved config.yaml). What older
    versions saved besides is dropped: the model's run-time keys and the test hooks of their
    `debug` section."""
    if isinstance(tree, dict):
        tree = {k: v for k, v in tree.items() if k != "debug"}
        if isinstance(tree.get("model"), dict):
            tree["model"] = without_run_time_keys(tree["model"], "model")
    return _build(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from ..files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
