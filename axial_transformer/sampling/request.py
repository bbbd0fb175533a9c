"""A sampling request: what to draw and how, in one object that `sample` builds from its keyword
arguments and the command line builds from its flags; its checks, its batches, and the canvas,
classes and Gumbel noise that the cached sampler and the naive one both draw from."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.decoding import LogitsHook
from ..model.transformer import AxialTransformer
from ..precision import choose_precision


@dataclass
class Request:
    """The images to draw. Every field but `num_samples` is a keyword argument of `sample`."""

    num_samples: int
    # Divides the logits (T < 1 sharpens, T > 1 flattens); must be > 0.
    temperature: float = 1.0
    # A torch.Generator for the Gumbel noise (rows drawn in (channel, row) order; video: (frame,
    # channel, row)).
    generator: torch.Generator | None = None
    # [B or 1, C, H, W] integer pixels and a bool mask ([B or 1, C, T, H, W] for a video model;
    # `given_frames` builds them from a clip's first frames, a prefix of the order). Masked
    # pixels are kept as given; the rest are drawn in the model's order, each exactly from
    # softmax(logits / T) given everything before it. Known pixels LATER in the order are kept
    # but not conditioned on, so completion is exact only when the known pixels form a prefix of
    # the order (the top K rows of a one-channel image) and approximate otherwise: for the top K
    # rows of an RGB image, the red rows below K are drawn without seeing the known green and
    # blue rows.
    known: Tensor | None = None
    known_mask: Tensor | None = None
    # Gumbel noise [B, C, H, W, V] ([B, C, T, H, W, V] for video) to use instead of `generator`
    # (for exact tests).
    noise: Tensor | None = None
    # A class-conditional model's classes: an int for every image or [B] (-1: none).
    labels: int | Tensor | None = None
    # Classifier-free guidance scale s; 1 samples the conditional model as it is.
    guidance: float = 1.0
    # Images drawn at once (None: all of them); the batches are drawn in turn, one generator
    # drawing the noise of each in turn.
    batch_size: int | None = None
    # bf16 autocast; by default where the device runs bf16 fast (precision.py).
    autocast: bool | None = None
    # Called as on_logits(c, i, j, logits [B, V]) (on_logits(t, c, i, j, logits) for video) for
    # every subpixel of each batch (for tests and for scoring samples as they are drawn); keeps
    # fully known rows from being skipped.
    on_logits: LogitsHook | None = None
    # The cached sampler's: a tqdm bar advancing per row.
    progress: bool = False
    # The cached sampler's: run each outer-decoder row and each subpixel as one torch.compile'd
    # graph with the weights frozen in: faster at batch 1 on the CPU, after a compilation per
    # model and batch size (docs/benchmarks.md); the graphs are kept while the weights stay
    # unchanged. Same draws; the logits may differ from the eager ones in the last bits.
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size"):
            n = getattr(self, name)
            if (n is not None or name == "num_samples") and (
                    isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"temperature must be a positive finite number, got {t!r}")
        if not isinstance(self.guidance, (int, float)) or not abs(self.guidance) < float("inf"):
            raise ValueError(f"guidance must be a finite number, got {self.guidance!r}")
        if self.noise is not None and self.generator is not None:
            raise ValueError("pass either noise or a generator, not both")
        if (self.known is None) != (self.known_mask is None):
            raise ValueError("known and known_mask go together: pass both or neither")

    def batches(self) -> list[Request]:
        """The request in parts of at most `batch_size` images, each with its share of the
        per-image tensors (known pixels, noise and labels of all `num_samples` images)."""
        n, size = self.num_samples, self.batch_size or self.num_samples
        per_image = [name for name in ("known", "known_mask", "noise", "labels")
                     if isinstance(t := getattr(self, name), Tensor) and t.ndim and len(t) == n]
        return [dataclasses.replace(self, num_samples=min(size, n - first), batch_size=None,
                                    **{name: getattr(self, name)[first : first + size]
                                       for name in per_image})
                for first in range(0, n, size)]

    def start(self, model: AxialTransformer) -> tuple:
        """Check the request against the model (a ValueError if bad) -> the canvas [B, *shape]
        (long, on the model's device, the known pixels filled in), known_mask there, an iterator
        over the Gumbel noise of each row, the labels [B] (long; [2B] with guidance, the second
        half told "no class") and whether to autocast."""
        known, known_mask = self.check(model)
        param, n = next(model.parameters()), self.num_samples
        x = torch.zeros((n, *canvas_shape(model)), dtype=torch.long, device=param.device)
        if known is not None:
            known_mask = known_mask.to(param.device)
            x = torch.where(known_mask, known.to(param.device, torch.long), x)
        labels = self.labels
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = torch.full((n,), labels)
        elif isinstance(labels, Tensor) and labels.ndim == 1 and len(labels) == 1:
            labels = labels.expand(n)
        labels = model.check_labels(labels, x)
        if self.guidance != 1:
            labels = torch.cat([labels, torch.full_like(labels, -1)])
        autocast = self.autocast
        if autocast is None:
            autocast = choose_precision("auto", param.device, model.config.dim).bf16
        noise_dtype = torch.promote_types(param.dtype, torch.float32)
        return x, known_mask, self.gumbel_rows(model, param.device, noise_dtype), labels, autocast

    def check(self, model: AxialTransformer) -> tuple[Tensor | None, Tensor | None]:
        """Validate what depends on the model; return (known, known_mask) expanded to the batch,
        or Nones."""
        shape, levels = canvas_shape(model), model.config.levels
        n, known, known_mask, noise = self.num_samples, self.known, self.known_mask, self.noise
        if self.guidance != 1 and model.config.num_classes == 0:
            raise ValueError("guidance needs a class-conditional model (num_classes > 0)")
        if noise is not None:
            full = (n, *shape, levels)
            if not isinstance(noise, Tensor) or not noise.dtype.is_floating_point:
                raise ValueError(f"noise must be a floating-point tensor of shape {list(full)}")
            if tuple(noise.shape) != full:
                raise ValueError(f"noise must have shape {list(full)} (Gumbel noise per subpixel "
                                 f"and value), got {list(noise.shape)}")
        if known is None:
            return None, None
        for name, t in (("known", known), ("known_mask", known_mask)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 1 + len(shape) or tuple(t.shape[1:]) != shape or \
                    t.shape[0] not in (1, n):
                raise ValueError(f"{name} must have shape [{n} or 1, "
                                 f"{', '.join(map(str, shape))}], got {list(t.shape)}")
        if known.dtype.is_floating_point or known.dtype.is_complex or known.dtype == torch.bool:
            raise ValueError(f"known must hold integer pixel values 0..{levels - 1} (e.g. uint8), "
                             f"got a {known.dtype} tensor")
        if known_mask.dtype != torch.bool:
            raise ValueError(f"known_mask must be a bool tensor (True = keep), got "
                             f"{known_mask.dtype}")
        known, known_mask = known.expand(n, *shape), known_mask.expand(n, *shape)
        given = known[known_mask.to(known.device)]
        if given.numel() and (int(given.min()) < 0 or int(given.max()) >= levels):
            raise ValueError(f"known pixel values must lie in 0..{levels - 1}, "
                             f"got {int(given.min())}..{int(given.max())}")
        return known, known_mask

    def gumbel_rows(self, model: AxialTransformer, device: torch.device,
                    dtype: torch.dtype) -> Iterator[Tensor]:
        """The Gumbel noise of each row, [B, W, V], in (channel, row) order; a video model's in
        (frame, channel, row) order."""
        c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
        g = self.generator
        tiny = torch.finfo(dtype).tiny
        for t in range(max(1, model.config.frames)):
            for ci in range(c):
                for i in range(h):
                    if self.noise is not None:
                        row = (ci, t, i) if model.config.frames else (ci, i)
                        yield self.noise[(slice(None), *row)].to(device=device, dtype=dtype)
                        continue
                    u = torch.rand((self.num_samples, w, levels), generator=g, dtype=dtype,
                                   device=device if g is None else g.device)
                    yield u.clamp_(min=tiny).log_().neg_().log_().neg_().to(device)


def canvas_shape(model: AxialTransformer) -> tuple[int, ...]:
    """What one sample is: (C, H, W) for an image model, (C, T, H, W) for a video model."""
    c, (h, w), frames = model.config.channels, model.config.image_size, model.config.frames
    return (c, frames, h, w) if frames else (c, h, w)
