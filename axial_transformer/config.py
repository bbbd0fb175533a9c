"""The model's configuration and its named presets."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from .attention import ATTENTION_PATHS


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
    # Recompute each block's activations in the backward pass: needed to fit the paper's
    # ImageNet-64 model on one GPU, costs about a third more compute.
    gradient_checkpointing: bool = False
    # Values a subpixel takes: 256 for 8-bit images.
    levels: int = field(default=256)
    # Classes of a class-conditional model (0: unconditional). Labels 0..num_classes-1 enter
    # through a learned embedding; -1 means "no class" (label dropout, guidance).
    num_classes: int = 0
    # Their names, in label order (empty: numbers only); training takes them from the data.
    class_names: tuple[str, ...] = ()
    # How attention is computed: "sdpa" (torch's fused kernels), "matmul" (plain matmuls) or
    # "auto" (SDPA but in a compiled CPU decoding step). The same model and weights whichever.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(self.image_size)
        if len(self.image_size) != 2 or any(int(s) < 1 for s in self.image_size):
            raise ValueError(f"image_size must be (height, width), got {self.image_size}")
        for name in ("channels", "dim", "heads", "inner_layers", "levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        # The encoder and the outer decoder alternate row and column layers; an odd count would
        # leave one axis with less receptive field (the official code asserts the same).
        for name in ("encoder_layers", "outer_layers"):
            n = getattr(self, name)
            if n < 2 or n % 2:
                raise ValueError(
                    f"{name} must be a positive even number (row/column pairs), got {n}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or more, got "
                             f"{self.num_classes}")
        self.class_names = tuple(str(name) for name in self.class_names)
        if self.class_names:
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(self.class_names)} names for "
                                 f"num_classes={self.num_classes}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, "
                             f"got {self.attention!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AxialTransformerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> AxialTransformerConfig:
        """The config of a saved dict (config.json); an unknown key is a ValueError naming it."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{source}: unknown model setting {key!r}{hint}; the settings "
                                 f"are {', '.join(known)}")
        try:
            return cls(**values)
        except TypeError as e:  # a value of the wrong type
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["class_names"] = list(self.class_names)
        return d


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
        gradient_checkpointing=True,
    ),
    # The benchmark size: width 256, 4/4/4 layers, 4.9M parameters at 32x32.
    "small": dict(dim=256, heads=8, encoder_layers=4, outer_layers=4, inner_layers=4),
    # The demo's size: about 200 images per second in training on two CPU cores at 16x16.
    "tiny": dict(dim=64, heads=4, encoder_layers=2, outer_layers=2, inner_layers=2),
}
