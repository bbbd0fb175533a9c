"""bf16 or fp32: the one rule every entry point follows to pick its precision (docs/training.md).

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs that support it,
x86 CPUs with AVX512-BF16 or AMX. Elsewhere torch emulates it through fp32, about 1 GFLOP/s
against 75-90 on AVX2. "auto" picks bf16 there, or on a CPU whose bf16 matmul beats fp32 in a
short check, and on a CPU only for a model at least CPU_BF16_MIN_WIDTH wide; "bf16" forces it
(warning once where emulated); "no" is fp32.
"""

from __future__ import annotations

import functools
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Setting = Literal["auto", "bf16", "no"]

# CPU feature flags (as Linux lists them in /proc/cpuinfo) of native bf16 matmuls.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# "auto" picks bf16 on a CPU without those flags only when its bf16 matmul is this much faster
# than fp32: a margin, so that a shared machine's noise does not flip the choice.
MIN_CPU_SPEEDUP = 1.2
# The check's matmul: [256, 256] @ [256, 256], 34 MFLOP, well under 0.1 s even emulated.
CHECK_SIZE = 256
CHECK_REPEATS = 5
# On a CPU, bf16 autocast costs a narrow model more than its matmuls gain: its casts and the
# rest of the step are a larger share than in a wide one. `python bench/precision_bench.py`
# (training steps of a 16x16 RGB model, fp32 and bf16 in turn; AVX512 with AVX512-BF16,
# 2026-12-08): bf16 ran 0.83x as fast as fp32 at width 32, 1.03x at 64, 0.72x at 128; 1.41x at
# 256 and 1.92x at 512.
CPU_BF16_MIN_WIDTH = 256


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str  # why, in words, for the run's first lines

    def autocast(self, device_type: str) -> AbstractContextManager:
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def __str__(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'} ({self.reason})"


def choose_precision(setting: Setting, device: torch.device | str,
                     width: int | None = None) -> Precision:
    """`setting` on `device`, for a model `width` wide (the model's dim; None: any)."""
    device = torch.device(device)
    if setting == "no":
        return Precision(False, "asked for fp32")
    if setting not in ("auto", "bf16"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'no', got {setting!r}")
    fast, why = bf16_is_fast(device)
    if setting == "auto":
        if fast and device.type == "cpu" and width is not None and width < CPU_BF16_MIN_WIDTH:
            return Precision(False, f"auto: {why}, but at width {width} (under "
                             f"{CPU_BF16_MIN_WIDTH}) bf16 autocast gains nothing on a CPU")
        return Precision(fast, f"auto: {why}")
    if not fast and device.type == "cpu":
        warn_emulated_bf16(why)
    return Precision(True, "asked for bf16")


def bf16_is_fast(device: torch.device) -> tuple[bool, str]:
    """Whether `device` runs bf16 matmuls faster than fp32, and why."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return supported, (f"{torch.cuda.get_device_name(device)} "
                           f"{'supports' if supported else 'does not support'} bf16")
    if device.type != "cpu":
        return False, f"no bf16 check for {device.type} devices"
    flags = cpu_bf16_flags()
    if flags:
        return True, f"the CPU reports {', '.join(flags)}"
    capability = torch.backends.cpu.get_cpu_capability()
    speedup = cpu_bf16_speedup()
    if speedup >= MIN_CPU_SPEEDUP:
        return True, f"bf16 matmuls ran {speedup:.1f}x faster than fp32 on this {capability} CPU"
    speed = f"{1 / speedup:.1f}x slower" if speedup < 1 else f"only {speedup:.2f}x faster"
    return False, (f"this {capability} CPU has no AVX512-BF16 or AMX and its bf16 matmuls ran "
                   f"{speed} than fp32")


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 features this CPU reports: in torch's capability name, or among its
    `cpuinfo` flags on Linux (torch 2.14 names only DEFAULT, AVX2, AVX512 and the like)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "BF16" in capability.upper() or "AMX" in capability.upper():
        return [capability]
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")),
                 [])
    return [f for f in BF16_CPU_FLAGS if f in flags]


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of the same CPU matmul, best of CHECK_REPEATS each, taken in turn."""
    a, b = torch.randn(2, CHECK_SIZE, CHECK_SIZE).unbind()
    operands = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(operands, float("inf"))
    threads = torch.get_num_threads()
    # One thread: the speed of a core, which a busy machine's other processes do not stall as
    # they stall threads that wait for each other.
    torch.set_num_threads(1)
    try:
        for round in range(CHECK_REPEATS + 1):
            for dtype, (x, y) in operands.items():
                start = time.perf_counter()
                torch.mm(x, y)
                if round:  # the first round warms both up
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def warn_emulated_bf16(why: str) -> None:
    warnings.warn(f"bf16 was asked for, but {why}: it is emulated here; precision 'auto' or "
                  "'no' (fp32) runs faster", stacklevel=3)
