"""A command's output files: checked before the compute they hold, named so that two different
requests never write to the same file.

A command that computes for minutes and then cannot write its result has wasted those minutes,
so an output that could not be written (an existing folder, a path under a file, a read-only
folder, a disk without room for it) is refused before anything is computed; an existing output
is refused too unless the command was told to replace it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def safe_name(text: str) -> str:
    """`text` as one file-name component: every character but ASCII letters, digits, '.', '-'
    and '_' becomes '_', so that a class named 'T-shirt/top' makes no sub-folder."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


def check_output(path: Path, option: str, needed_bytes: int = 0, replace: bool = False,
                 folder: bool = False) -> None:
    """Raise a ValueError naming `option` if the file (or with `folder`, the folder) `path` could
    not be written: a folder is there (or a file), it lies under a file, the folder it goes in is
    not writable or has fewer than `needed_bytes` free, or (unless `replace`) it exists already.
    Creates nothing."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            found, expected = ("a file", "folder") if folder else ("a folder", "file")
            raise ValueError(f"{option} {path}: is {found}; expected a {expected} name")
        if not replace:
            raise ValueError(f"{option} {path}: exists already (from an earlier run); choose "
                             "another name, or pass --overwrite to replace it")
    parent = path.parent
    while not parent.exists():  # the nearest existing folder, which the write would fill in
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write into {parent} (read-only or not "
                         "permitted)")
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ValueError(f"{option} {path}: {parent} has {free:,} bytes free, the output needs "
                         f"about {needed_bytes:,}")
