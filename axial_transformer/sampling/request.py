"""A sampling request: its checks, the canvas with the known pixels filled in, the classes and
the Gumbel noise, the same for the cached sampler and the naive one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ..model.transformer import AxialTransformer
from ..precision import choose_precision


class Request(NamedTuple):
    x: Tensor  # [B, C, H, W] long on the model's device, known pixels filled in
    mask: Tensor | None  # known_mask on the model's device
    rows: Iterator[Tensor]  # the Gumbel noise of each row
    autocast: bool
    labels: Tensor | None  # [B] long, a class-conditional model's


def start(
    model: AxialTransformer,
    num_samples: int,
    temperature: float,
    generator: torch.Generator | None,
    known: Tensor | None,
    known_mask: Tensor | None,
    noise: Tensor | None,
    autocast: bool | None,
    labels: int | Tensor | None,
    guidance: float,
) -> Request:
    known, known_mask = check_request(model, num_samples, temperature, generator, known,
                                       known_mask, noise, guidance)
    param = next(model.parameters())
    c, (h, w) = model.config.channels, model.config.image_size
    x = torch.zeros((num_samples, c, h, w), dtype=torch.long, device=param.device)
    if known is not None:
        known_mask = known_mask.to(param.device)
        x = torch.where(known_mask, known.to(param.device, torch.long), x)
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = torch.full((num_samples,), labels)
    elif isinstance(labels, Tensor) and labels.ndim == 1 and len(labels) == 1:
        labels = labels.expand(num_samples)
    labels = model.check_labels(labels, x)
    if autocast is None:
        autocast = choose_precision("auto", param.device).bf16
    rows = gumbel_rows(model, num_samples, noise, generator, param.device,
                        torch.promote_types(param.dtype, torch.float32))
    return Request(x, known_mask, rows, autocast, labels)


def output(x: Tensor, levels: int) -> Tensor:
    return x.to(torch.uint8) if levels <= 256 else x


def check_request(
    model: AxialTransformer,
    num_samples: int,
    temperature: float,
    generator: torch.Generator | None,
    known: Tensor | None,
    known_mask: Tensor | None,
    noise: Tensor | None,
    guidance: float,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate the arguments; return (known, known_mask) expanded to the batch, or Nones."""
    c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not isinstance(guidance, (int, float)) or not abs(guidance) < float("inf"):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if guidance != 1 and model.config.num_classes == 0:
        raise ValueError("guidance needs a class-conditional model (num_classes > 0)")
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either noise or a generator, not both")
        shape = (num_samples, c, h, w, levels)
        if not isinstance(noise, Tensor) or not noise.dtype.is_floating_point:
            raise ValueError(f"noise must be a floating-point tensor of shape {list(shape)}")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {list(shape)} (Gumbel noise per subpixel and "
                             f"value), got {list(noise.shape)}")
    if known is None and known_mask is None:
        return None, None
    if known is None or known_mask is None:
        raise ValueError("known and known_mask go together: pass both or neither")
    for name, t in (("known", known), ("known_mask", known_mask)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or tuple(t.shape[1:]) != (c, h, w) or t.shape[0] not in (1, num_samples):
            raise ValueError(f"{name} must have shape [{num_samples} or 1, {c}, {h}, {w}], "
                             f"got {list(t.shape)}")
    if known.dtype.is_floating_point or known.dtype.is_complex or known.dtype == torch.bool:
        raise ValueError(f"known must hold integer pixel values 0..{levels - 1} (e.g. uint8), "
                         f"got a {known.dtype} tensor")
    if known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor (True = keep), got {known_mask.dtype}")
    shape = (num_samples, c, h, w)
    known, known_mask = known.expand(shape), known_mask.expand(shape)
    given = known[known_mask.to(known.device)]
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= levels):
        raise ValueError(f"known pixel values must lie in 0..{levels - 1}, "
                         f"got {int(given.min())}..{int(given.max())}")
    return known, known_mask


def gumbel_rows(
    model: AxialTransformer,
    num_samples: int,
    noise: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[Tensor]:
    """The Gumbel noise of each row, [B, W, V], in (channel, row) order."""
    c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
    gen_device = generator.device if generator is not None else device
    tiny = torch.finfo(dtype).tiny
    for ci in range(c):
        for i in range(h):
            if noise is not None:
                yield noise[:, ci, i].to(device=device, dtype=dtype)
            else:
                u = torch.rand((num_samples, w, levels), generator=generator, device=gen_device,
                               dtype=dtype)
                yield u.clamp_(min=tiny).log_().neg_().log_().neg_().to(device)
