"""Speed tricks that reach into torch's internals, each in one place behind a name that says
what it does. Entry points and the sampler call them; the model's arithmetic does not depend on
them. Timings that motivated each are in docs/benchmarks.md.

Private APIs used here (checked against torch 2.6 and later):
  torch.ops.aten._softmax_backward_data   the fused softmax backward that autograd itself runs
  torch._inductor.config                  freezing and autotuning for the compiled sampler
  torch._dynamo.reset_code                forget the graphs compiled for a function
  Tensor._version                         tell weights written in place since a compilation
  torch._foreach_lerp_                    the EMA's update of every weight in one call
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Below this batch a CPU sampling step is a chain of matrix-vector products too small to split
# between threads: two threads are slower than one there.
SINGLE_THREAD_BELOW_BATCH = 8


def softmax_backward_kernel(grad: Tensor, p: Tensor) -> Tensor:
    """d scores = p * (grad - sum(grad * p)) along the last axis, for p = softmax(scores), in
    one fused kernel: the one autograd runs for `Tensor.softmax`."""
    return torch.ops.aten._softmax_backward_data(grad, p, -1, p.dtype)


@contextlib.contextmanager
def decoding_threads(batch: int, device: torch.device, compiled: bool) -> Iterator[None]:
    """One CPU thread while an eager decoding loop runs at a small batch; restored after."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and batch < SINGLE_THREAD_BELOW_BATCH and not compiled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frozen_weights_compilation(device: torch.device) -> contextlib.AbstractContextManager:
    """Inductor settings for graphs whose weights are constants: `freezing` folds them in, and on
    the CPU max-autotune lets its GEMM templates pack the matrix-vector products of a decoding
    step (it times them against mkl's and keeps the faster). `torch.compile(options=...)` does
    not pass `freezing` through, hence the config patch."""
    return torch._inductor.config.patch(
        freezing=True, max_autotune=device.type == "cpu", autotune_num_choices_displayed=0,
        max_autotune_report_choices_stats=False,
    )


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or written in place (every in-place write bumps
    a tensor's version counter)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def lerp_all_(targets: list[Tensor], sources: list[Tensor], weight: float) -> None:
    """targets[k] += weight * (sources[k] - targets[k]) for every k, in one fused call."""
    torch._foreach_lerp_(targets, sources, weight)


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
