"""The model's configuration and its named presets."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass, field

from .attention import ATTENTION_PATHS

# Upper bounds far above any model this code trains (the paper's largest has dim 2048, 8 layers
# per stack, 256 levels), so that a config.json or an override cannot ask for more parameters
# than tensor sizes can count, nor take minutes to lay out before its weights are checked.
MAX_SIDE = 2**16
MAX_MLP_RATIO = 1024
# The video fields' defaults; an image model (frames 0) leaves them out of its saved config, so
# that image configs and checkpoints stay those of earlier versions.
FRAME_LAYERS = 3
VIDEO_DEFAULTS = {"frames": 0, "frame_layers": FRAME_LAYERS}
INT_RANGES = {
    "channels": (1, 1024), "dim": (1, 2**16), "heads": (1, 2**16),
    "encoder_layers": (1, 256), "outer_layers": (1, 256), "inner_layers": (1, 256),
    "levels": (1, 2**16), "num_classes": (0, 2**20), "frames": (0, MAX_SIDE),
    "frame_layers": (1, 255),
}


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """An int or a finite float (not a bool, NaN or infinity)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def shown(value: object) -> str:
    """`value` for an error message: its repr cut short, whatever its size or nesting depth."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


@dataclass
class AxialTransformerConfig:
    # Height and width of the images; non-square images work (rows and columns are separate axes).
    image_size: tuple[int, int] = (32, 32)
    # Channels per image, generated one after another (channel-major order, paper section 4.3).
    channels: int = 3
    # Model width D. The paper uses 1536 (ImageNet-32) and 2048 (ImageNet-64).
    dim: int = 256
    # Attention heads; dim must divide by it. The paper uses 16.
    heads: int = 8
    # Unmasked row/column blocks of the channel encoder over the channels already generated.
    encoder_layers: int = 4
    # Outer decoder blocks: unmasked row then masked column attention, alternating.
    outer_layers: int = 4
    # Inner decoder blocks: masked row attention.
    inner_layers: int = 4
    # MLP hidden width as a multiple of dim; the official code uses 1.
    mlp_ratio: float = 1.0
    # Dropout on each residual branch (0.04 on ImageNet-32 in the paper, 0 on ImageNet-64).
    dropout: float = 0.0
    # Values a subpixel takes: 256 for 8-bit images.
    levels: int = field(default=256)
    # Classes of a class-conditional model (0: unconditional). Labels 0..num_classes-1 enter
    # through a learned embedding; -1 means "no class" (label dropout, guidance).
    num_classes: int = 0
    # Their names, in label order (empty: numbers only); training takes them from the data.
    class_names: tuple[str, ...] = ()
    # Frames per clip of a video model (0: an image model). A video is modelled frame after
    # frame, each frame as an image given a context computed from the frames before it.
    frames: int = 0
    # Frame encoder blocks of a video model, cycling unmasked row, unmasked column and masked
    # time attention (a positive multiple of 3, so that every axis gets its share).
    frame_layers: int = FRAME_LAYERS

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            self.image_size = (self.image_size, self.image_size)
        if not (isinstance(self.image_size, (list, tuple)) and len(self.image_size) == 2
                and all(is_int(s) and 1 <= s <= MAX_SIDE for s in self.image_size)):
            raise ValueError(f"image_size must be (height, width), two integers in 1..{MAX_SIDE}, "
                             f"got {shown(self.image_size)}")
        self.image_size = tuple(self.image_size)
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if not (is_int(value) and low <= value <= high):
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {shown(value)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        # The encoder and the outer decoder alternate row and column layers; an odd count would
        # leave one axis with less receptive field (the official code asserts the same).
        for name in ("encoder_layers", "outer_layers"):
            n = getattr(self, name)
            if n % 2:
                raise ValueError(
                    f"{name} must be a positive even number (row/column pairs), got {n}"
                )
        # `not a <= x <= b` is also true of NaN, for which every comparison is false.
        if not (is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {shown(self.dropout)}")
        if not (is_real(self.mlp_ratio) and 0 < self.mlp_ratio <= MAX_MLP_RATIO):
            raise ValueError(f"mlp_ratio must be a number in (0, {MAX_MLP_RATIO}], got "
                             f"{shown(self.mlp_ratio)}")
        if not (isinstance(self.class_names, (list, tuple))
                and all(isinstance(name, str) for name in self.class_names)):
            raise ValueError(f"class_names must be a list of strings, got "
                             f"{shown(self.class_names)}")
        self.class_names = tuple(self.class_names)
        self.check_video_fields()
        if self.class_names:
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(self.class_names)} names for "
                                 f"num_classes={self.num_classes}")

    def check_video_fields(self) -> None:
        if self.frames == 0:
            if self.frame_layers != FRAME_LAYERS:
                raise ValueError(f"frame_layers ({self.frame_layers}) applies to video models "
                                 "only: set frames > 0 as well")
            return
        if self.frame_layers % 3:
            raise ValueError(f"frame_layers must be a positive multiple of 3 (row, column and "
                             f"time blocks), got {self.frame_layers}")
        if self.num_classes:
            raise ValueError(f"class-conditional video models are not supported: num_classes "
                             f"must be 0 when frames > 0, got {self.num_classes}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AxialTransformerConfig:
        return cls(**with_preset({"preset": name, **overrides}))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> AxialTransformerConfig:
        """The config of a saved dict (config.json); an unknown key is a ValueError naming it."""
        values = without_run_time_keys(values, source)
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{source}: unknown model setting {key!r}{hint}; the settings "
                                 f"are {', '.join(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:  # a value of the wrong type or out of range
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["class_names"] = list(self.class_names)
        if self.frames == 0:  # an image model's config is what it was before video models
            for key in VIDEO_DEFAULTS:
                del d[key]
        return d


def with_preset(values: dict) -> dict:
    """Model settings that may name a `preset` -> that preset's settings, updated by the others
    (a YAML `model:` section of `preset: imagenet32` plus what differs)."""
    if "preset" not in values:
        return values
    values = dict(values)
    name = values.pop("preset")
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {shown(name)}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **values}


# Run-time choices that older versions saved with the model (model.set_gradient_checkpointing,
# model.set_attention now): a saved config holding one still loads, once it is of its old form.
RUN_TIME_KEYS = {"gradient_checkpointing": ("true or false", lambda v: isinstance(v, bool)),
                 "attention": (f"one of {', '.join(ATTENTION_PATHS)}",
                               lambda v: isinstance(v, str) and v in ATTENTION_PATHS)}


def without_run_time_keys(values: dict, source: str) -> dict:
    """`values` less the keys of RUN_TIME_KEYS; a ValueError if one of them is malformed."""
    for key, (expected, valid) in RUN_TIME_KEYS.items():
        if key in values and not valid(values[key]):
            raise ValueError(f"{source}: {key} must be {expected}, got {shown(values[key])}")
    return {k: v for k, v in values.items() if k not in RUN_TIME_KEYS}


# The paper's models (Ho et al. 2019 and the official config_imagenet{32,64}.py) and
# CPU-sized ones. The paper models have about 341M and 606M parameters.
PRESETS: dict[str, dict] = {
    "imagenet32": dict(
        image_size=(32, 32), channels=3, dim=1536, heads=16,
        encoder_layers=8, outer_layers=8, inner_layers=8, dropout=0.04,
    ),
    "imagenet64": dict(
        image_size=(64, 64), channels=3, dim=2048, heads=16,
        encoder_layers=8, outer_layers=8, inner_layers=8, dropout=0.0,
    ),
    # The benchmark size: width 256, 4/4/4 layers, 4.9M parameters at 32x32.
    "small": dict(dim=256, heads=8, encoder_layers=4, outer_layers=4, inner_layers=4),
    # The demo's size: about 200 images per second in training on two CPU cores at 16x16.
    "tiny": dict(dim=64, heads=4, encoder_layers=2, outer_layers=2, inner_layers=2),
}
