"""What every benchmark prints: the machine it ran on, markdown tables, and timings taken by
torch.utils.benchmark."""

from __future__ import annotations

import datetime
import platform
import statistics
from collections.abc import Callable, Iterable

import torch
from torch.utils.benchmark import Timer

from axial_transformer.precision import choose_precision


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line(precision: str, threads: int | str | None = None) -> str:
    """A header's machine: the date, the CPU, the vector code torch runs on it (its capability,
    which ATEN_CPU_CAPABILITY can narrow), torch, threads, and the precision the bench ran in."""
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_model()}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
            f"{threads or torch.get_num_threads()} threads, precision {precision}")


def sampler_precision(width: int, device: torch.device | str = "cpu") -> str:
    """The precision `sample` picks by default for a model `width` wide on `device`, and why."""
    return str(choose_precision("auto", device, width))


def table(header: list[str], rows: Iterable[list]) -> None:
    """A markdown table, each row printed as it comes (`rows` may be a generator)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


def seconds(fn: Callable[[], object], min_run_time: float = 0.0) -> float:
    """Median seconds of a call of `fn`, by Timer.blocked_autorange (a warm-up call, then blocks
    of calls for at least `min_run_time`; CUDA synchronised), at torch's thread count (Timer's
    own default is one thread)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def in_turn(calls: dict[str, Callable[[], object]], rounds: int,
            min_run_time: float = 0.0) -> dict[str, list[float]]:
    """Each call's seconds in every round, the calls timed in turn and the order reversed every
    other round: a shared machine's speed drifts, and calls in turn meet a drift alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in list(calls)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(seconds(calls[name], min_run_time))
    return times


def ratio(a: list[float], b: list[float]) -> str:
    """The median over rounds of b / a, with its range."""
    r = [y / x for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
