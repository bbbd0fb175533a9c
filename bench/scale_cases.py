"""What bench/scale_bench.py measures: model FLOPs counted on real steps, the memory of a real
bf16 training step, and a checkpoint written by the training code.

    python bench/scale_cases.py --case memory --config imagenet32 --batch 5 [--gc] [--layers 2]
    python bench/scale_cases.py --case checkpoint --config imagenet64 --dir /tmp/ckpt

scale_bench.py runs each case in a fresh process, since peak memory is per process; a case prints
one JSON line. The FLOP counts are cheap and run in scale_bench.py's own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from axial_transformer import AxialTransformer, AxialTransformerConfig

# Widths at which FLOPs are counted (multiples of the presets' 16 heads), and the quick ones.
FIT_WIDTHS = (64, 128, 192)
QUICK_FIT_WIDTHS = (16, 32, 48)
QUICK_DIM = 32


def preset(name: str, dim: int | None = None, layers: int | None = None,
           **overrides) -> AxialTransformerConfig:
    """A paper preset, optionally at another width or with `layers` blocks in each of the
    encoder, outer and inner decoders. Its models run set_attention("sdpa"), the fused-kernel
    path every GPU run takes."""
    if dim is not None:
        overrides["dim"] = dim
    if layers is not None:
        overrides.update(encoder_layers=layers, outer_layers=layers, inner_layers=layers)
    return AxialTransformerConfig.from_preset(name, **overrides)


def random_images(config: AxialTransformerConfig, batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, config.channels, *config.image_size), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# FLOPs.
#
# FlopCounterMode counts the matmuls, convolutions and attention kernels that run, 2 FLOPs per
# multiply-add (layer norms, softmax, the GELU and Adam are left out). Its table has no entry for
# the CPU's fused attention kernel, which the "sdpa" path runs here: the entries below count what
# a causal kernel computes, the t(t+1)/2 query-key pairs on and below the diagonal, and the
# backward as twice the forward (the scores it recomputes are not model FLOPs).


def causal_share(length: int, is_causal: bool) -> Fraction:
    return Fraction(length + 1, 2 * length) if is_causal else Fraction(1)


def cpu_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                        **kwargs) -> int:
    return int(sdpa_flop_count(query, key, value) * causal_share(query[2], is_causal))


def cpu_attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0,
                                 is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return int(2 * sdpa_flop_count(query, key, value) * causal_share(query[2], is_causal))


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        cpu_attention_backward_flops,
}


def counted_flops(config: AxialTransformerConfig, kind: str, gc: bool = False) -> int:
    """FLOPs of one image: "train" is a step's forward and backward of the random-channel loss
    (one channel slice), "eval" the forward of bits/dim over every channel."""
    torch.manual_seed(0)
    model = AxialTransformer(config).set_attention("sdpa").set_gradient_checkpointing(gc)
    x = random_images(config, 1)
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        if kind == "train":
            model.loss(x, "random", channel=torch.zeros(1, dtype=torch.long)).backward()
        else:
            with torch.no_grad():
                model.eval().bits_per_dim(x)
    return counter.get_total_flops()


def flops_at_width(name: str, dim: int, widths: tuple[int, int, int], **overrides) -> dict:
    """Training FLOPs per image (without and with gradient checkpointing, whose recomputed
    forward is counted as executed) and evaluation FLOPs per image of preset `name` at width
    `dim`, from counts at the smaller `widths`.

    Every counted FLOP is a dense layer's (proportional to D^2: D x D, D x 3D and D x hidden
    weights with hidden = D) or the convolution's, the logits' or attention's (proportional to
    D: heads x head width = D), so a count is a D^2 + b D exactly. Two widths give a and b; the
    third is counted too and must be predicted to the FLOP, or the fit is reported as inexact.
    """
    result = {}
    for key, kind, gc in (("train", "train", False), ("train_gc", "train", True),
                          ("eval", "eval", False)):
        counts = {w: counted_flops(preset(name, w, **overrides), kind, gc)
                  for w in widths}
        (d1, f1), (d2, f2), (d3, f3) = counts.items()
        a = (Fraction(f2, d2) - Fraction(f1, d1)) / (d2 - d1)
        b = Fraction(f1, d1) - a * d1
        result[key] = float(a * dim**2 + b * dim)
        result[f"{key}_exact"] = a * d3**2 + b * d3 == f3
    return result


# ---------------------------------------------------------------------------------------------
# Memory of a training step.


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive while the mode is on, op by op, and their peak: on the CPU
    what torch.cuda.max_memory_allocated() reports on a GPU (where the caching allocator's
    fragmentation comes on top). A storage counts from the op that returns it until it is freed;
    those of `existing` tensors (the weights, the batch) are not counted. `trace` holds the
    bytes alive after each op: two batches' traces, op by op, give the step's memory at any
    batch (scale_bench.Activation), wherever its peak falls."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self.trace: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Freed storages go first, so that a new one at a freed one's address is counted.
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t.untyped_storage())
        self.peak = max(self.peak, self.now)
        self.trace.append(self.now)
        return out

    def count(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self.existing or key in self.live or storage.nbytes() == 0:
            return  # a view or an in-place result of a storage already known
        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.now += storage.nbytes()


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def map_large_blocks_apart() -> None:
    """Make glibc's malloc serve every block of 1 MiB or more from its own mmap, returned to the
    kernel when freed. By default that threshold rises as blocks are freed, up to 32 MiB, and
    blocks below it then come from the heap, whose freed holes stay resident: the RSS of a step
    at 32x32 then depends on whether its tensors are just under 32 MiB or just over (batch 5 of
    imagenet32 showed 0.5 GiB more than batch 6). Fixed, the RSS follows the live tensors."""
    import ctypes

    m_mmap_threshold = -3  # <malloc.h>
    ctypes.CDLL(None).mallopt(m_mmap_threshold, 2**20)


def memory_case(args: argparse.Namespace) -> dict:
    """The memory one bf16 training step (forward and backward of the random-channel loss, as
    train_step.py takes it) adds to a process holding the fp32 model and the batch: the
    gradients, autocast's bf16 copies of the weights, the activations saved for the backward
    and the kernels' outputs, at their peak, counted as live tensors and as resident memory."""
    map_large_blocks_apart()
    config = preset(args.config, args.dim, args.layers)
    torch.manual_seed(0)
    model = AxialTransformer(config).set_attention("sdpa").set_gradient_checkpointing(args.gc)
    # training mode: dropout masks are saved as on a GPU
    x = random_images(config, args.batch)
    channel = torch.arange(args.batch) % config.channels
    tensors = LiveTensorBytes([*model.parameters(), *model.buffers(), x, channel])
    before = rss_bytes()
    start = time.perf_counter()
    try:
        with tensors:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.loss(x, "random", channel=channel)
            loss.backward()
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("memory", "alloc")):
            raise
        cap = resource.getrlimit(resource.RLIMIT_DATA)[0]
        size = re.search(r"allocate (\d+) bytes", str(e))
        failed = f", allocating {int(size[1]) / 2**30:.2f} GiB" if size else ""
        return {"error": f"out of memory under the {cap / 2**30:.1f} GiB cap{failed}"}
    return {"batch": args.batch, "tensors": tensors.peak, "trace": tensors.trace,
            "rss": peak_rss_bytes() - before,
            "peak": peak_rss_bytes(), "seconds": time.perf_counter() - start,
            "params": model.num_parameters()}


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def checkpoint_case(args: argparse.Namespace) -> dict:
    """Write one checkpoint and the EMA export of the full-size model with the training code's
    own `save_checkpoint`, and measure them on disk."""
    from accelerate import Accelerator

    from axial_transformer.training.ema import EMA
    from axial_transformer.training.resume import save_checkpoint

    config = preset(args.config, args.dim)
    model = AxialTransformer(config)
    ema = EMA(model, 0.99995)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam holds its moments once it has stepped; zero gradients move nothing
    optimizer.zero_grad(set_to_none=True)
    run_dir = Path(args.dir)
    start = time.perf_counter()
    path = save_checkpoint(Accelerator(cpu=True), model, optimizer, ema,
                           {"step": 1, "skipped_steps": 0}, run_dir, keep=1)
    seconds = time.perf_counter() - start
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir())}
    result = {"params": model.num_parameters(), "checkpoint": directory_bytes(path),
              "export": directory_bytes(run_dir / "export"), "files": files,
              "seconds": seconds}
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["memory", "checkpoint"], required=True)
    parser.add_argument("--config", choices=["imagenet32", "imagenet64"], required=True)
    parser.add_argument("--dim", type=int, help="another width (the quick run's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--layers", type=int, help="blocks in each of the three stacks")
    parser.add_argument("--dir", help="where the checkpoint case writes (removed after)")
    args = parser.parse_args()
    result = memory_case(args) if args.case == "memory" else checkpoint_case(args)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
