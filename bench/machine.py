"""What the benchmark tables say about the machine they were measured on."""

from __future__ import annotations

import platform

import torch

from axial_transformer.precision import choose_precision


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(precision: str, threads: int | None = None) -> str:
    """A header's machine: the CPU, the vector code torch runs on it (its capability, which
    ATEN_CPU_CAPABILITY can narrow), torch, threads, and the precision the bench ran in."""
    return (f"{cpu_model()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch "
            f"{torch.__version__}, {threads or torch.get_num_threads()} threads, precision "
            f"{precision}")


def sampler_precision(device: torch.device | str = "cpu") -> str:
    """The precision `sample` picks by default on `device`, and why."""
    return str(choose_precision("auto", device))
