"""A uint8 .npy [N, ...] written row by row with pwrite, not through a memory map: a store into
a map that the disk has no room for kills the process with SIGBUS, leaving the temporary file to
fill the disk, while a pwrite fails with an OSError that names the file, and the caller removes
it. The file is reserved whole when created (posix_fallocate), so that a disk too small for it is
found at the first image, not hours later."""

from __future__ import annotations

import errno
import io
import math
import os
from pathlib import Path

import numpy as np


def npy_header(count: int, row_shape: tuple[int, ...]) -> bytes:
    """numpy pads the header so that the first axis can grow or shrink in place."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (count, *row_shape)})
    return header.getvalue()


class RowWriter:
    """Rows of a uint8 .npy at `path`, created for `count` rows or (`create=False`) opened in
    place, written by index; `name` is what an error calls it (the output it will become)."""

    def __init__(self, path: Path, count: int, row_shape: tuple[int, ...], name: str,
                 create: bool = True) -> None:
        self.name, self.row_shape = name, tuple(row_shape)
        self.row_bytes = math.prod(row_shape)
        self.offset = len(npy_header(count, row_shape))
        self.file = open(path, "wb" if create else "r+b")  # noqa: SIM115 (closed by close())
        if create:
            self.write_at(npy_header(count, row_shape), 0)
            size = self.offset + count * self.row_bytes
            try:
                os.posix_fallocate(self.file.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                    raise self.error(e, size) from None

    def error(self, e: OSError, size: int) -> OSError:
        return OSError(e.errno, f"{self.name}: cannot write {size:,} bytes ({e.strerror})")

    def write(self, index: int, rows: np.ndarray) -> None:
        """Write `rows` (uint8, [k, *row_shape]) as rows index .. index + k - 1."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        self.write_at(rows, self.offset + index * self.row_bytes)

    def write_at(self, data: bytes | np.ndarray, position: int) -> None:
        data = memoryview(data).cast("B")
        try:
            while data:  # pwrite may write less than it was given
                done = os.pwrite(self.file.fileno(), data, position)
                data, position = data[done:], position + done
        except OSError as e:
            raise self.error(e, len(data)) from None

    def truncate(self, count: int) -> None:
        """Cut the file to its first `count` rows."""
        header = npy_header(count, self.row_shape)
        assert len(header) == self.offset, "npy header length changed"
        self.write_at(header, 0)
        self.file.truncate(self.offset + count * self.row_bytes)

    def close(self) -> None:
        self.file.close()
