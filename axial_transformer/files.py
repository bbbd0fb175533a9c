"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def fsync_directory(directory: str | Path) -> None:
    """Make the renames and deletions inside `directory` durable (POSIX keeps them in the
    directory's own data, which a file's fsync does not flush)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, tensors: dict) -> None:
    """Save tensors atomically in the safetensors format (a JSON header and raw data)."""
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
