"""The speed paths that earned their place, and every use of torch's private API, in one module.

Each CPU path here gained at least 10% on an AVX2 and on an AVX-512 CPU, through torch's public
API (docs/benchmarks.md, "CPU speed paths", gives each path's gain per CPU class and the paths
measured and deleted). The model's arithmetic does not depend on any of them.

The compiled sampler's settings follow: they apply on every device, and three of them need
torch's private API, which the project keeps to this module:
  torch._inductor.config   `freezing`, which `torch.compile(options=...)` does not pass through
  torch._dynamo.reset_code forget the graphs compiled for one function, not every graph
  Tensor._version          tell weights written in place since a compilation
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# ------------------------------------------------------------------------------------------------
# CPU: eager decoding.

# Below this batch a CPU decoding step is a chain of matrix-vector products, too small to split
# between threads: a second thread only waits for the first, and on a loaded machine for a core.
MATRIX_VECTOR_BELOW_BATCH = 8


def matrix_vector_steps(batch: int, device: torch.device) -> bool:
    """Whether decoding steps of `batch` sequences on `device` are matrix-vector products."""
    return device.type == "cpu" and batch < MATRIX_VECTOR_BELOW_BATCH


@contextlib.contextmanager
def eager_decoding(model: torch.nn.Module, batch: int, device: torch.device) -> Iterator[None]:
    """What an eager decoding loop wants while it runs, all restored after: its steps hold a few
    tokens each, so Python costs it more than arithmetic. Plain attribute lookups; on the CPU
    below batch 8, one thread."""
    with decoding_threads(batch, device), plain_attributes(model):
        yield


@contextlib.contextmanager
def decoding_threads(batch: int, device: torch.device) -> Iterator[None]:
    """One CPU thread while a decoding loop runs at a small batch; restored after."""
    threads = torch.get_num_threads()
    if matrix_vector_steps(batch, device):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def plain_attributes(model: torch.nn.Module) -> Iterator[None]:
    """Every module's parameters and submodules found by plain attribute lookup while inside.

    `nn.Module` keeps them in dicts of its own that Python reaches through `Module.__getattr__`,
    about a microsecond per lookup, and a decoding step at batch 1 looks up some twenty per
    block. References in each module's `__dict__` are found directly; they are the same objects,
    `Module.__setattr__` drops a reference when a new parameter or submodule takes its name, and
    the rest are dropped on the way out."""
    added = []
    for module in model.modules():
        found = {**dict(module.named_parameters(recurse=False)), **dict(module.named_children())}
        refs = {k: v for k, v in found.items() if k not in module.__dict__}
        module.__dict__.update(refs)
        added.append((module, refs))
    try:
        yield
    finally:
        for module, refs in added:
            for name, value in refs.items():
                if module.__dict__.get(name) is value:
                    del module.__dict__[name]


# ------------------------------------------------------------------------------------------------
# The compiled sampler (every device).


def frozen_weights_compilation(
    device: torch.device, autotune: bool = True
) -> contextlib.AbstractContextManager:
    """Inductor settings for graphs whose weights are constants: `freezing` folds them in, and on
    the CPU max-autotune (unless `autotune` is False) lets its GEMM templates pack the
    matrix-vector products of a decoding step (it times them against mkl's and keeps the
    faster; compiling the candidates takes most of a first compilation).
    `torch.compile(options=...)` does not pass `freezing` through, hence the config patch."""
    return torch._inductor.config.patch(
        freezing=True, max_autotune=autotune and device.type == "cpu",
        autotune_num_choices_displayed=0,
        max_autotune_report_choices_stats=False,
    )


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or written in place (every in-place write bumps
    a tensor's version counter)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def forget_compiled(function: Callable) -> None:
    """Drop every graph compiled for `function` (its weights changed, or another model came)."""
    torch._dynamo.reset_code(function.__code__)


def skip_guard_checks(skip: bool) -> contextlib.AbstractContextManager:
    """Dynamo checks every input and parameter tensor of a graph on each call, tens of
    microseconds per decoding step. A caller whose every call passes tensors made the same way
    may skip the checks once a call has passed them. The stance is global: no user code may run
    inside it."""
    if not skip:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
