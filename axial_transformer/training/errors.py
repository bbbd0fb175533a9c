"""What a training run stops with: each message is one line that says what to change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SetupError(RuntimeError):
    """The run cannot start as configured (a run dir in use, a tracker that does not start,
    a checkpoint that cannot be resumed)."""


class TrainingError(RuntimeError):
    """The run cannot go on (it diverged, a checkpoint could not be written)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the file and what is wrong."""


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised inside names `path` when it names no file of its own: a full disk's
    ENOSPC comes from write() or fsync(), which know no file name."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        if e.errno is None:
            raise OSError(f"{path}: {e}") from None
        raise OSError(e.errno, e.strerror, str(path)) from None


def one_line(error: BaseException) -> str:
    """An error's message for the command line. A DataLoader worker's error comes back as the
    same type with the worker's whole traceback as its message; its last line is the error."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(error).__name__}: ") else last
