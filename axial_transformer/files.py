"""Files written whole or not at all (a reader sees the old file or the new one, never half of
one), and safetensors read with care: no pickle, every shape checked against the model's with the
parameter named, nothing non-finite loaded."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

# Weights are floating point; an integer or bool tensor would be cast to float without a word.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process's umask: what an ordinary open() or mkdir() would create."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # After the write: mkstemp creates 0600, and a writer may rename its own 0600 temporary
        # file over ours (safetensors does). The result gets the mode an open() would give it.
        os.chmod(tmp, umask_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a new temporary folder beside `out`, then put it in `out`'s place:
    a reader sees the old folder or the new one, never a mix or part of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        fsync_directory(out.parent)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # the earlier output back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def fsync_directory(directory: str | Path) -> None:
    """Make the renames and deletions inside `directory` durable (POSIX keeps them in the
    directory's own data, which a file's fsync does not flush)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(state, tmp)
        except OSError:
            raise
        except Exception as e:  # safetensors' own error type, e.g. for a full disk
            raise OSError(f"{Path(path).name}: {e}") from None

    atomic_write(path, write)


def safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's (shape, dtype), without reading any data. safetensors checks that the
    header's offsets cover the file exactly, so these shapes are bounded by the file's size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"not a readable safetensors file ({e})") from None


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in safetensors_header(file).items()}


def check_shapes(file: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """A ValueError naming the first parameter whose shape in `file` differs, that is missing or
    extra, or that is not stored as floating point."""
    try:
        header = safetensors_header(file)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    another = "the checkpoint is from another model configuration"
    for name, shape in expected.items():
        if name not in header:
            raise ValueError(f"{file}: has no parameter {name}; {another}")
        if header[name][0] != tuple(shape):
            raise ValueError(f"{file}: parameter {name} has shape {list(header[name][0])}, this "
                             f"model expects {list(shape)}: {another}")
    for name, (_, dtype) in sorted(header.items()):
        if name not in expected:
            raise ValueError(f"{file}: has parameter {name} that this model lacks; {another}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{file}: parameter {name} is stored as {dtype}; expected "
                             f"floating-point weights ({', '.join(FLOAT_DTYPES)})")


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; a ValueError if a tensor holds NaN or inf
    (weights never start a run poisoned)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"not a readable safetensors file ({e})") from None
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or inf")
    return tensors
