"""The DERIVED half of bench/scale_bench.py: memory per GPU and time per 100k steps of a paper
config on A100s and H100s, from the parameters, FLOPs and step memory measured on the CPU and the
assumptions below. Nothing here ran on a GPU; every figure is printed with its formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from axial_transformer import AxialTransformer, AxialTransformerConfig

GLOBAL_BATCH = 64  # the paper's batch, train.batch_size in both configs
GPU_COUNTS = (1, 8, 64)
STEPS = 100_000
TEST_IMAGES = 49_999  # the paper's validation split, scored whole at every evaluation
GiB = 2**30
# Of the GPU's 80 GiB, what is left for the CUDA context, cuBLAS and NCCL workspaces and the
# caching allocator's fragmentation (an allowance, not a measurement).
GPU_MEMORY, HEADROOM = 80 * GiB, 4 * GiB


@dataclass(frozen=True)
class GPU:
    name: str
    bf16: float  # dense bf16 tensor-core peak, FLOP/s
    fp32: float  # fp32 peak without TF32: what fp32 matmuls run at under torch's defaults
    node_bus: float  # all-reduce bus bandwidth between the 8 GPUs of a node, bytes/s (assumed)
    net_bus: float  # ... across nodes, per GPU (assumed)


# Peaks from the data sheets (SXM parts). Bus bandwidths: about 80% of NVLink's one-way rate in
# a node (A100 300 GB/s, H100 450 GB/s), and of one InfiniBand NIC per GPU across nodes (HDR
# 200 Gb/s, NDR 400 Gb/s), as NCCL's all-reduce reaches on such machines.
GPUS = (GPU("A100", 312e12, 19.5e12, 240e9, 20e9),
        GPU("H100 SXM", 989e12, 67e12, 360e9, 40e9))


@dataclass
class Activation:
    """Memory a bf16 training step adds at micro-batch m: after each of the step's ops, the live
    bytes are `fixed + m x per_image` (its own pair for each op: gradients and bf16 weight
    copies do not grow with the batch, saved activations do), and the step takes the highest.
    Which op that is moves with m: at a few images it can be the end of the backward, where
    every gradient is alive; at 64, the end of the forward, where every activation is."""

    lines: list[tuple[float, float]]  # (fixed, per_image), one per op
    how: str

    @classmethod
    def from_traces(cls, trace_a: list[int], batch_a: int, trace_b: list[int], batch_b: int,
                    how: str) -> Activation:
        """From the live bytes after each op at two batches that run the same ops."""
        if len(trace_a) != len(trace_b):
            raise ValueError(f"batches {batch_a} and {batch_b} ran different ops "
                             f"({len(trace_a)} and {len(trace_b)})")
        lines = set()
        for a, b in zip(trace_a, trace_b, strict=True):
            per_image = (b - a) / (batch_b - batch_a)
            lines.add((a - batch_a * per_image, per_image))
        return cls(sorted(lines), how)

    def at(self, micro_batch: int) -> float:
        return max(fixed + micro_batch * per_image for fixed, per_image in self.lines)


def parameter_count(config: AxialTransformerConfig) -> int:
    with torch.device("meta"):
        return AxialTransformer(config).num_parameters()


def states_bytes(params: int) -> int:
    """fp32 weights, Adam's two fp32 moments and the fp32 EMA: replicated on every GPU under
    DDP, which splits only the batch."""
    return (4 + 8 + 4) * params


def ddp_bucket_bytes(params: int, gpus: int) -> int:
    """DDP all-reduces the fp32 gradients through buckets of its own, a second copy of them
    (Accelerate leaves gradient_as_bucket_view off)."""
    return 4 * params if gpus > 1 else 0


def gpu_memory(params: int, step: float, gpus: int) -> float:
    """Bytes on each GPU at the higher of a step's two peaks, both over the states and DDP's
    buckets: the forward and backward's, `step` (Activation.at the micro-batch: gradients, bf16
    weight copies, activations); and the optimizer step's, with the 4 P of gradients and the
    4 P square root of Adam's second moments that torch's foreach Adam (the GPU's) takes out of
    place."""
    return states_bytes(params) + ddp_bucket_bytes(params, gpus) + max(step, 8 * params)


def largest_fitting_micro_batch(params: int, step: Callable[[int], float], gpus: int,
                                per_gpu: int) -> int | None:
    """The largest divisor of the per-GPU batch whose step fits (train.grad_accumulation then
    takes per_gpu / it micro-batches per step), or None when not even one image fits; `step`
    gives a micro-batch's step memory."""
    fitting = [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0
               and gpu_memory(params, step(m), gpus) <= GPU_MEMORY - HEADROOM]
    return fitting[0] if fitting else None


def step_seconds(flops_per_image: float, params: int, gpu: GPU, gpus: int, mfu: float
                 ) -> tuple[float, float]:
    """(compute, all-reduce) seconds of one step. Compute: the per-GPU batch's executed FLOPs at
    `mfu` of the bf16 peak. All-reduce: a ring moves 2 (N - 1) / N of the 4 P gradient bytes
    through each GPU at the bus bandwidth (NVLink within 8 GPUs, the network beyond)."""
    compute = GLOBAL_BATCH / gpus * flops_per_image / (gpu.bf16 * mfu)
    bus = gpu.node_bus if gpus <= 8 else gpu.net_bus
    allreduce = 2 * (gpus - 1) / gpus * 4 * params / bus
    return compute, allreduce


def duration(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()


def memory_table(configs: dict[str, AxialTransformerConfig], activations: dict) -> None:
    print(f"## Memory per GPU at global batch {GLOBAL_BATCH} (DERIVED from the measurements)")
    print("total = 16 P (fp32 weights 4 P + Adam's moments 8 P + EMA 4 P, replicated on every GPU "
          "under DDP) + 4 P (DDP's gradient buckets, with more than one GPU) + max(step(m), 8 P): "
          "the forward and backward's peak at the per-GPU micro-batch m (measured above, bf16 "
          "autocast) or the optimizer step's (gradients 4 P + the 4 P square root "
          "of Adam's second moments that torch's foreach Adam takes out of place). Fits "
          f"when total <= {(GPU_MEMORY - HEADROOM) / GiB:.0f} GiB of an 80 GiB A100/H100 "
          f"({HEADROOM / GiB:.0f} GiB assumed for the CUDA context, workspaces and "
          "fragmentation). Evaluation (no gradients, fp32, eval.batch_size per process) is "
          "not covered.")
    rows = []
    for name, config in configs.items():
        params = parameter_count(config)
        for gc in (False, True):
            act = activations.get((name, gc))
            if act is None:
                continue
            for gpus in GPU_COUNTS:
                per_gpu = GLOBAL_BATCH // gpus
                total = gpu_memory(params, act.at(per_gpu), gpus)
                m = largest_fitting_micro_batch(params, act.at, gpus, per_gpu)
                if m == per_gpu:
                    verdict = "fits"
                elif m is None:
                    verdict = "does NOT fit, even at micro-batch 1"
                else:
                    total_m = gpu_memory(params, act.at(m), gpus)
                    verdict = (f"no: train.grad_accumulation={per_gpu // m} (micro-batch {m}, "
                               f"{total_m / GiB:.1f} GiB)")
                rows.append([name, "on" if gc else "off", str(gpus), str(per_gpu),
                             f"{states_bytes(params) / GiB:.1f}",
                             f"{ddp_bucket_bytes(params, gpus) / GiB:.1f}",
                             f"{act.at(per_gpu) / GiB:.1f}", f"{total / GiB:.1f}", verdict])
    print_table(["config", "GC", "GPUs", "per GPU", "states GiB", "buckets GiB", "step(m) GiB",
                 "total GiB", "fits 80 GiB?"], rows)


def time_table(configs: dict[str, AxialTransformerConfig], flops: dict, mfu: float) -> None:
    print(f"## Time per {STEPS:,} steps (DERIVED: counted FLOPs at an ASSUMED {mfu:.0%} of peak)")
    print(f"step = max(compute, all-reduce), DDP overlapping the two; compute = {GLOBAL_BATCH} / "
          f"N x executed FLOPs per training image / ({mfu:.0%} x bf16 peak); all-reduce = "
          "2 (N-1)/N x 4 P bytes / bus bandwidth. Peaks: A100 312, H100 SXM 989 TFLOP/s bf16 "
          "dense; 19.5 and 67 TFLOP/s fp32. Bus: 240 / 360 GB/s within a node (NVLink), "
          "20 / 40 GB/s per GPU across nodes (InfiniBand), assumed. "
          f"{mfu:.0%}: a planning figure for bf16 PyTorch training of dense transformers on these "
          "GPUs (well-tuned large runs report 40-55%, PaLM 46%); eager kernels, unfused layer "
          "norms and 32-64-long attention axes argue for the low end. Each config with its own "
          "gradient_checkpointing setting. One evaluation = the 49,999 test images at the same "
          "share of the fp32 peak (eval.bf16=false, the default: torch runs fp32 matmuls "
          "without TF32) or of the bf16 peak (eval.bf16=true).")
    rows = []
    for name, config in configs.items():
        params = parameter_count(config)
        gc = name == "imagenet64"  # train.gradient_checkpointing of configs/NAME.yaml
        per_image = flops[name]["train_gc" if gc else "train"]
        for gpu in GPUS:
            for gpus in GPU_COUNTS:
                compute, allreduce = step_seconds(per_image, params, gpu, gpus, mfu)
                step = max(compute, allreduce)
                evaluation = TEST_IMAGES / gpus * flops[name]["eval"] / mfu
                rows.append([name, "on" if gc else "off", gpu.name, str(gpus),
                             f"{1e3 * compute:.0f}", f"{1e3 * allreduce:.0f}",
                             f"{1e3 * step:.0f}", duration(STEPS * step),
                             duration(evaluation / gpu.fp32), duration(evaluation / gpu.bf16)])
    print_table(["config", "GC", "GPU", "GPUs", "compute ms", "all-reduce ms", "step ms",
                 f"{STEPS // 1000}k steps", "one eval fp32", "one eval bf16"], rows)


def derived_tables(configs: dict[str, AxialTransformerConfig], flops: dict, activations: dict,
                   mfu: float) -> None:
    memory_table(configs, activations)
    time_table(configs, flops, mfu)
