"""safetensors files read with care: no pickle, every shape checked against the model's with the
parameter named, nothing non-finite loaded."""

from __future__ import annotations

from pathlib import Path

import torch


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading (or unpickling) any data."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"not a readable safetensors file ({e})") from None


def check_shapes(file: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise a ValueError naming the first parameter whose shape in `file` differs."""
    try:
        found = safetensors_shapes(file)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
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


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU. A ValueError if it is not safetensors or a
    tensor holds NaN or inf (weights never start a run poisoned)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"not a readable safetensors file ({e})") from None
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or inf")
    return tensors
