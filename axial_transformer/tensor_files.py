"""safetensors files read with care: no pickle, every shape checked against the model's with the
parameter named, nothing non-finite loaded."""

from __future__ import annotations

from pathlib import Path

import torch

# Weights are floating point; an integer or bool tensor would be cast to float without a word.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's (shape, dtype) from a safetensors header, without reading (or unpickling)
    any data. safetensors checks that the header's offsets cover the file exactly, so these
    shapes are bounded by the file's size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"not a readable safetensors file ({e})") from None


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading (or unpickling) any data."""
    return {k: shape for k, (shape, _) in safetensors_header(file).items()}


def check_shapes(file: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise a ValueError naming the first parameter whose shape in `file` differs, or that is
    not stored as floating point."""
    try:
        header = safetensors_header(file)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    found = {k: shape for k, (shape, _) in header.items()}
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
    for name, (_, dtype) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{file}: parameter {name} is stored as {dtype}; expected "
                             f"floating-point weights ({', '.join(FLOAT_DTYPES)})")


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
