"""Speed tricks that reach into torch's internals, each in one place behind a name that says
what it does. Entry points and the sampler call them; the model's arithmetic does not depend on
them. Timings that motivated each are in docs/benchmarks.md.

Private APIs used here (checked against torch 2.6 and later):
  torch.ops.aten._softmax_backward_data   the fused softmax backward that autograd itself runs
  torch._inductor.config                  freezing and autotuning for the compiled sampler
  torch._dynamo.reset_code                forget the graphs compiled for a function
  Tensor._version                         tell weights written in place (since a compilation,
                                          or while laid out column-major)
  torch._foreach_lerp_                    the EMA's update of every weight in one call
  Module._parameters, Module._modules     the dicts behind a module's attributes
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Below this batch a CPU decoding step is a chain of matrix-vector products: too small to split
# between threads, and faster with each weight stored transposed. From it on they are
# matrix-matrix products, which take the weights as they are.
MATRIX_VECTOR_BELOW_BATCH = 8


def matrix_vector_steps(batch: int, device: torch.device) -> bool:
    """Whether decoding steps of `batch` sequences on `device` are matrix-vector products."""
    return device.type == "cpu" and batch < MATRIX_VECTOR_BELOW_BATCH


def softmax_backward_kernel(grad: Tensor, p: Tensor) -> Tensor:
    """d scores = p * (grad - sum(grad * p)) along the last axis, for p = softmax(scores), in
    one fused kernel: the one autograd runs for `Tensor.softmax`."""
    return torch.ops.aten._softmax_backward_data(grad, p, -1, p.dtype)


@contextlib.contextmanager
def eager_decoding(model: torch.nn.Module, batch: int, device: torch.device) -> Iterator[None]:
    """What an eager decoding loop wants while it runs, all restored after: its steps hold a few
    tokens each, so Python and memory layout cost it more than arithmetic. Plain attribute
    lookups; on the CPU below batch 8, one thread and the linear layers' weights column-major."""
    with decoding_threads(batch, device), plain_attributes(model), \
            column_major_linears(model) if matrix_vector_steps(batch, device) \
            else contextlib.nullcontext():
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
def column_major_linears(model: torch.nn.Module) -> Iterator[None]:
    """Each `nn.Linear` weight W [out, in] stored transposed while inside: W^T contiguous, so
    that `F.linear` computes x W^T without a transpose in the BLAS call, as the CPU's
    matrix-vector products run faster. The parameters stay the same objects with the same values;
    on the way out each takes back its own storage (its version and address unchanged, so
    compiled graphs stay valid), with anything written to the copy copied back. The copies take
    as much memory again as the weights they copy."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    originals = [w.data for w in weights]
    for w in weights:
        w.data = w.data.t().contiguous().t()
    versions = [w._version for w in weights]
    try:
        yield
    finally:
        for w, original, version in zip(weights, originals, versions, strict=True):
            if w._version != version:
                original.copy_(w.data)
            w.data = original


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
        found = {**module._parameters, **module._modules}
        refs = {k: v for k, v in found.items() if v is not None and k not in module.__dict__}
        module.__dict__.update(refs)
        added.append((module, refs))
    try:
        yield
    finally:
        for module, refs in added:
            for name, value in refs.items():
                if module.__dict__.get(name) is value:
                    del module.__dict__[name]


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
