"""The speed paths that earned their place, and every use of torch's private API, in one module.

Each CPU path gained at least 10% on an AVX2 and on an AVX-512 CPU (docs/benchmarks.md, "CPU
speed paths", gives each gain and the paths measured and deleted); the model's arithmetic does
not depend on any of them. The compiled sampler's settings (every device) need torch's private
API: torch._inductor.config (`freezing`), torch._dynamo.reset_code, Tensor._version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# Below this batch a CPU decoding step is a chain of matrix-vector products, too small to split
# between threads: a second thread only waits for the first, and on a loaded machine for a core.
MATRIX_VECTOR_BELOW_BATCH = 8


@contextlib.contextmanager
def eager_decoding(model: torch.nn.Module, batch: int, device: torch.device) -> Iterator[None]:
    """Plain attribute lookups and, on the CPU below batch 8, one thread, while an eager decoding
    loop runs: its steps hold a few tokens each, so Python costs it more than arithmetic."""
    with decoding_threads(batch, device), plain_attributes(model):
        yield


@contextlib.contextmanager
def decoding_threads(batch: int, device: torch.device) -> Iterator[None]:
    threads = torch.get_num_threads()
    if device.type == "cpu" and batch < MATRIX_VECTOR_BELOW_BATCH:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def plain_attributes(model: torch.nn.Module) -> Iterator[None]:
    """Every module's parameters and submodules in its `__dict__` while inside: `nn.Module`
    finds them through `Module.__getattr__`, about a microsecond per lookup, some twenty per block
    in a decoding step at batch 1. `Module.__setattr__` drops a reference when a new parameter or
    submodule takes its name; the rest are dropped on the way out."""
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


def frozen_weights_compilation(device: torch.device,
                               autotune: bool = True) -> contextlib.AbstractContextManager:
    """Inductor settings for graphs whose weights are constants: `freezing` folds them in
    (`torch.compile(options=...)` does not pass it through, hence the patch); on the CPU,
    max-autotune lets GEMM templates pack a decoding step's matrix-vector products (timed against
    mkl's; compiling the candidates takes most of a first compilation)."""
    return torch._inductor.config.patch(
        freezing=True, max_autotune=autotune and device.type == "cpu",
        autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or written in place (which bumps its version)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def forget_compiled(function: Callable) -> None:
    """Drop every graph compiled for `function` (its weights changed, or another model came)."""
    torch._dynamo.reset_code(function.__code__)


def skip_guard_checks(skip: bool) -> contextlib.AbstractContextManager:
    """Skip Dynamo's checks of every tensor of a graph (tens of microseconds per decoding step),
    for a caller whose every call passes tensors made the same way, once a call passed them. The
    stance is global: no user code may run inside it."""
    if not skip:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
