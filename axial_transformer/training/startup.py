"""Start-up: every check that can fail, made before hours are spent and before anything is
written into run_dir (docs/training.md lists them in order), then the claim on run_dir for the
run's life. A start-up that fails leaves run_dir as it found it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..model.video import build_model
from .checkpoint import run_config
from .config import RunConfig, save_config
from .distributed import agree, build_accelerator
from .errors import SetupError, naming
from .resume import CheckpointState, export_problem, select_checkpoint
from .run_log import drop_stale_records, final_record, init_trackers


@dataclass
class Start:
    accelerator: object
    train_set: Dataset
    test_set: Dataset
    micro_batch: int  # images per process per micro-batch
    checkpoint: CheckpointState | None  # what to resume from, read and checked
    complete: dict | None  # the final record when run_dir holds this run already finished
    begun: bool = False  # begin_run has written into run_dir: a failure no longer undoes it


@contextmanager
def start_run(cfg: RunConfig) -> Iterator[Start]:
    """Check everything and claim run_dir until the block ends; a failure before `begin_run`
    undoes the claim. Every process runs this alike, so that all of them stop, not one."""
    train_set, test_set, like = check_inputs(cfg)
    accelerator = build_accelerator(cfg)
    claim = RunDirClaim(Path(cfg.run_dir)) if accelerator.is_main_process else None
    start = error = None
    try:
        if claim is not None:
            try:
                claim.take()
            except SetupError as e:
                error = e
        if agree(accelerator, error is not None)[0]:
            raise error or SetupError("the main process could not claim run_dir (its error says "
                                      "why)")
        start = check_run_dir(cfg, accelerator, train_set, test_set, like)
        if start.complete is None:
            init_trackers(accelerator, cfg)
        yield start
    except BaseException:  # a failed check, or SIGTERM during start-up (Preempted)
        if claim is not None and not (start is not None and start.begun):
            claim.abandon()
        raise
    finally:
        if claim is not None:
            claim.release()


def begin_run(cfg: RunConfig, start: Start) -> None:
    """The start-up's writes, once the run's objects are built: leftovers of killed runs removed,
    records past the step the run starts from dropped (at its last step the final record too:
    the final phase is done again), config.yaml saved."""
    start.begun = True
    if start.accelerator.is_main_process:
        step = start.checkpoint.step if start.checkpoint else 0
        run_dir = Path(cfg.run_dir)
        remove_leftovers(run_dir)
        drop_stale_records(run_dir / "metrics.jsonl", step, final=step >= cfg.train.steps)
        with naming(run_dir / "config.yaml"):
            save_config(cfg, run_dir / "config.yaml")
    start.accelerator.wait_for_everyone()


def check_inputs(cfg: RunConfig) -> tuple[Dataset, Dataset, nn.Module]:
    """The data, run_dir and the disk; returns the splits and the model on the meta device."""
    from ..data.splits import class_names, open_split

    mc = cfg.model
    train_set, test_set = (open_split(cfg.data.spec, split, mc.image_size, mc.channels,
                                      mc.num_classes, frames=mc.frames)
                           for split in ("train", "test"))
    if mc.num_classes and not mc.class_names:  # the data's names travel with the model
        mc.class_names = tuple(class_names(cfg.data.spec, "train") or ())
        mc.__post_init__()
    check_writable(cfg.run_dir)
    with torch.device("meta"):  # shapes and the parameter count without allocating weights
        like = build_model(mc)
    check_disk_space(cfg.run_dir, like.num_parameters(), cfg.checkpoint.keep)
    return train_set, test_set, like


def check_run_dir(cfg: RunConfig, accelerator, train_set: Dataset, test_set: Dataset,
                  like: nn.Module) -> Start:
    """What run_dir holds, read under the lock: nothing here writes."""
    run_dir = Path(cfg.run_dir)
    check_no_links(run_dir)
    main = accelerator.is_main_process
    if cfg.resume:
        check_saved_config(cfg)
        complete = final_record(run_dir / "metrics.jsonl", cfg.train.steps)
        stale = complete is not None and export_problem(run_dir)
        if stale and main:
            print(f"warning: {run_dir} has its final record, but {stale}; resuming to write "
                  "the export again", file=sys.stderr)
        if complete is not None and not stale:
            return Start(accelerator, train_set, test_set, 0, None, complete)
    checkpoint = select_checkpoint(cfg, like, accelerator.process_index, warn=main)
    processes = accelerator.num_processes
    if cfg.train.batch_size % (processes * cfg.train.grad_accumulation):
        raise SetupError(f"train.batch_size={cfg.train.batch_size} must divide evenly among "
                         f"{processes} process(es) x train.grad_accumulation="
                         f"{cfg.train.grad_accumulation}")
    micro = cfg.train.batch_size // (processes * cfg.train.grad_accumulation)
    if len(train_set) < micro * processes:
        raise SetupError(f"the train split has {len(train_set)} images, fewer than one batch "
                         f"({micro} per process x {processes})")
    return Start(accelerator, train_set, test_set, micro, checkpoint, None)


def check_saved_config(cfg: RunConfig) -> None:
    """A resumed run must keep the model it was trained with."""
    try:
        previous = run_config(Path(cfg.run_dir))
    except ValueError as e:
        raise SetupError(f"{e}; move it away to start afresh") from None
    if previous is not None and previous.model != cfg.model:
        raise SetupError(f"{Path(cfg.run_dir) / 'config.yaml'} was trained with model "
                         f"{previous.model}, but this run asks for {cfg.model}; resume with the "
                         "same model settings")


# What a run writes in run_dir. None of them, nor anything in the folders, may be a symbolic
# link: the run would write through it into a file or folder outside run_dir.
RUN_FILES = (".lock", "config.yaml", "metrics.jsonl", "heatmap.png")
RUN_FOLDERS = ("checkpoints", "export", "samples")
# Temporary files of writes that a kill interrupted: atomic_write's `.NAME.XXXXXXXX.tmp`, a
# checkpoint's `.step_NNNNNNN.tmp/` and the `.tmpXXXXXX` that safetensors writes before its rename.
LEFTOVER = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")


def check_no_links(run_dir: Path) -> None:
    """Raise a SetupError naming the first symbolic link where the run writes."""
    paths = [run_dir / name for name in (*RUN_FILES, *RUN_FOLDERS)]
    paths += [p for name in RUN_FOLDERS if (run_dir / name).is_dir()
              and not (run_dir / name).is_symlink() for p in sorted((run_dir / name).iterdir())]
    for path in paths:
        if path.is_symlink():
            raise SetupError(f"{path} is a symbolic link (to {os.readlink(path)}); the run "
                             "writes there and follows no link out of run_dir: remove it")


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files of earlier runs that were killed while writing."""
    doomed = [p for folder in (run_dir, *(run_dir / name for name in RUN_FOLDERS))
              if folder.is_dir() for p in folder.iterdir() if LEFTOVER.fullmatch(p.name)]
    for path in doomed:
        remove(path)
    return doomed


# ---------------------------------------------------------------------------------------------
# run_dir: writable, room on its disk, and one run at a time.


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_dir: str | Path) -> None:
    """Before any process group exists: can `run_dir` be created and written?"""
    existing = nearest_existing(Path(run_dir))
    if not existing.is_dir():
        raise ValueError(f"run_dir {run_dir} cannot be written: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"run_dir {run_dir} cannot be written: no write permission in "
                         f"{existing}, or a read-only file system")


def run_bytes(num_parameters: int, keep: int, bytes_per_value: int = 4) -> int:
    """Disk room a run needs at its peak: `keep` checkpoints and the one being written (weights,
    Adam's two moments, the EMA), the export, and a tenth and 64 MiB for everything else."""
    copies = (keep + 1) * (1 + 2 + 1) + 1
    return int(num_parameters * bytes_per_value * copies * 1.1) + 64 * 2**20


def check_disk_space(run_dir: str | Path, num_parameters: int, keep: int) -> None:
    """Raise a ValueError when the disk of `run_dir` cannot hold the run at its peak. Its
    checkpoints and export count as room: a resumed run replaces them."""
    run_dir = Path(run_dir)
    need = run_bytes(num_parameters, keep)
    held = sum(f.stat().st_size for folder in (run_dir / "checkpoints", run_dir / "export")
               if folder.is_dir() for f in folder.rglob("*") if f.is_file())
    room = shutil.disk_usage(nearest_existing(run_dir)).free + held
    if room < need:
        raise ValueError(f"run_dir {run_dir} has {room / 2**30:.2f} GiB free, but {keep + 1} "
                         f"checkpoints (checkpoint.keep={keep} and the one being written) and "
                         f"the export of {num_parameters:,} parameters need about "
                         f"{need / 2**30:.2f} GiB; free some space, lower checkpoint.keep or "
                         "choose another run_dir")


class RunDirClaim:
    """run_dir for one run at a time: an exclusive flock on RUN/.lock, which holds the holder's
    pid and host. The kernel drops the lock when its process ends, however it ends. Start-ups
    racing for a new run_dir each remove only what they created (mkdir and O_EXCL tell), and
    only while holding the lock: the folder and the lock file may be the winner's."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path = run_dir, run_dir / ".lock"
        self.fd: int | None = None
        self.created_dir = self.created_lock = False
        self.holder: list[str] = []

    def take(self) -> None:
        try:
            self.fd = self._open_locked()
        except OSError as e:
            if self.created_dir:  # it goes again unless another start-up is in it by now
                with suppress(OSError):
                    self.run_dir.rmdir()
            if e.errno == errno.ELOOP:
                raise SetupError(f"{self.path} is a symbolic link; the run writes its lock "
                                 "there and follows no link: remove it") from None
            raise SetupError(f"run_dir {self.run_dir} cannot be written: {e.strerror or e}"
                             ) from None
        if self.fd is None:
            who = (f"pid {self.holder[0]} on {self.holder[1]}" if len(self.holder) == 2
                   else "a process")
            raise SetupError(f"run_dir {self.run_dir} is in use by another run ({who} holds "
                             f"{self.path}); wait for it to end or choose another run_dir")
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as e:
            self.abandon()
            raise SetupError(f"run_dir {self.run_dir} cannot be written: {e.strerror or e}"
                             ) from None

    def _open_locked(self) -> int | None:
        """A descriptor of RUN/.lock holding its flock, or None with the holder's pid and host."""
        self.created_dir = self.created_lock = False
        for _ in range(100):  # a start-up that failed may remove run_dir or .lock meanwhile
            with suppress(FileExistsError):
                self.run_dir.mkdir(parents=True)
                self.created_dir = True
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                self.created_lock = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, flags)
                except FileNotFoundError:
                    continue
            except FileNotFoundError:  # run_dir removed between the mkdir and here
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.holder = os.read(fd, 256).decode(errors="replace").split()
                os.close(fd)
                self.created_dir = self.created_lock = False  # the holder's now, not ours
                return None
            if self._still_linked(fd):
                return fd
            os.close(fd)  # removed by a start-up that failed meanwhile: lock the new file
            self.created_lock = False
        raise OSError(errno.EBUSY, f"{self.path} kept changing while it was being locked")

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def abandon(self) -> None:
        """Undo the claim of a start-up that failed, under the lock: a run_dir it created is
        emptied, then removed only if still empty (once the lock file is unlinked, another
        start-up may claim it)."""
        if self.fd is None:
            return
        if self.created_dir:
            for path in self.run_dir.iterdir():
                remove(path)
        elif self.created_lock:
            self.path.unlink(missing_ok=True)
        self.release()
        if self.created_dir:
            with suppress(OSError):  # not empty: another start-up has claimed it meanwhile
                self.run_dir.rmdir()
