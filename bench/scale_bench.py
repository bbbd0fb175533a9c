"""Will the paper's configs run on my GPUs? A scale rehearsal of imagenet32 and imagenet64.

    python bench/scale_bench.py                  # everything, about 25 minutes on 2 quiet cores
    python bench/scale_bench.py --skip-run       # the tables only, without the end-to-end run
    python bench/scale_bench.py --quick          # width 32: checks the script runs; numbers mean
                                                 # nothing
    python bench/scale_bench.py --configs imagenet64 --mfu 0.35

MEASURED on this CPU for each paper config at full size: the parameters; the model FLOPs per
training image (random-channel objective) and per evaluated image, counted on real steps; a
checkpoint and export written by the training code; and the tensor bytes a bf16 training step
holds, op by op at two batches, with and without gradient checkpointing. ESTIMATED from these,
with the formulas and assumptions printed beside them (no GPU has confirmed them): the memory per
GPU at batch 64 over 1, 8 and 64 GPUs and the time per 100k steps on A100s and H100s. Then the
rehearsal: configs/imagenet32.yaml at full size trained for 3 steps on this CPU through train.py,
resumed for 2 more, evaluated and sampled, each stage a fresh process, to check that it runs and
fits. Allocations are capped below the memory available, so a case that does not fit fails in
torch instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from machine import machine_line, table
from model_bench import CPU_FLASH_FLOPS
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.training.config import load_config
from axial_transformer.training.run_log import read_records
from axial_transformer.training.startup import run_bytes

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
GLOBAL_BATCH = 64  # the paper's batch, train.batch_size in both configs
GPU_COUNTS = (1, 8, 64)
MICRO_BATCHES = (1, 8, 64)  # the per-GPU batches at global batch 64 on 64, 8 and 1 GPUs
STEPS = 100_000
TEST_IMAGES = 49_999  # the paper's validation split, scored whole at every evaluation
KEEP = 3  # checkpoint.keep in both paper configs
# Of the GPU's 80 GiB, what is left for the CUDA context, cuBLAS and NCCL workspaces and the
# caching allocator's fragmentation (an allowance, not a measurement).
GPU_MEMORY, HEADROOM = 80 * GiB, 4 * GiB
QUICK_DIM = 32
# Widths at which FLOPs are counted (multiples of the presets' 16 heads), and the quick ones.
FIT_WIDTHS, QUICK_FIT_WIDTHS = (64, 128, 192), (16, 32, 48)


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


def preset(name: str, dim: int | None = None) -> AxialTransformerConfig:
    """A paper preset, optionally at another width."""
    return AxialTransformerConfig.from_preset(name, **({"dim": dim} if dim else {}))


def build(config: AxialTransformerConfig, gc: bool = False) -> AxialTransformer:
    """The model on the fused-kernel attention path every GPU run takes, with or without
    gradient checkpointing (GC)."""
    torch.manual_seed(0)
    return AxialTransformer(config).set_attention("sdpa").set_gradient_checkpointing(gc)


def trains_with_gc(name: str) -> bool:
    """train.gradient_checkpointing of configs/NAME.yaml."""
    return load_config(ROOT / "configs" / f"{name}.yaml").train.gradient_checkpointing


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


# ---------------------------------------------------------------------------------------------
# Measured: FLOPs.


def counted_flops(config: AxialTransformerConfig, kind: str, gc: bool) -> int:
    """FLOPs of one image: "train" is a step's forward and backward of the random-channel loss
    (one channel slice), "eval" the forward of bits/dim over every channel."""
    model = build(config, gc)
    x = torch.randint(0, 256, (1, config.channels, *config.image_size), dtype=torch.uint8)
    counter = FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS)
    with counter:
        if kind == "train":
            model.loss(x, "random", channel=torch.zeros(1, dtype=torch.long)).backward()
        else:
            with torch.no_grad():
                model.eval().bits_per_dim(x)
    return counter.get_total_flops()


def flops_at_width(name: str, dim: int, widths: tuple[int, int, int]) -> dict:
    """Training FLOPs per image (without and with gradient checkpointing, whose recomputed
    forward is counted as executed) and evaluation FLOPs per image of preset `name` at width
    `dim`, from counts at the smaller `widths`.

    Every counted FLOP is a dense layer's (proportional to D^2) or the convolution's, the
    logits' or attention's (proportional to D), so a count is a D^2 + b D exactly. Two widths
    give a and b; the third is counted too and must be predicted to the FLOP.
    """
    result = {}
    for key, kind, gc in (("train", "train", False), ("train_gc", "train", True),
                          ("eval", "eval", False)):
        (d1, f1), (d2, f2), (d3, f3) = (
            (w, counted_flops(preset(name, w), kind, gc)) for w in widths)
        a = (Fraction(f2, d2) - Fraction(f1, d1)) / (d2 - d1)
        b = Fraction(f1, d1) - a * d1
        result[key] = float(a * dim**2 + b * dim)
        result["exact"] = result.get("exact", True) and a * d3**2 + b * d3 == f3
    return result


# ---------------------------------------------------------------------------------------------
# Measured: the tensor bytes of a training step.


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive while the mode is on, after each op (`trace`), and their
    peak: on the CPU what torch.cuda.max_memory_allocated() reports on a GPU (where the caching
    allocator's fragmentation comes on top). A storage counts from the op that returns it until
    it is freed; those of `existing` tensors (the weights, the batch) are not counted."""

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
                storage = t.untyped_storage()
                key = storage.data_ptr()
                # A view or an in-place result shares a storage already known.
                if key not in self.existing and key not in self.live and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        self.trace.append(self.now)
        return out


@dataclass
class Activation:
    """Memory a bf16 training step adds at micro-batch m: after each of the step's ops, the live
    bytes are `fixed + m x per_image` (its own pair for each op: gradients and bf16 weight
    copies do not grow with the batch, saved activations do), and the step takes the highest.
    Which op that is moves with m: at a few images it can be the end of the backward, where
    every gradient is alive; at 64, the end of the forward, where every activation is."""

    lines: list[tuple[float, float]]  # (fixed, per_image), one per op

    @classmethod
    def from_traces(cls, trace_a: list[int], batch_a: int, trace_b: list[int],
                    batch_b: int) -> Activation:
        """From the live bytes after each op at two batches that run the same ops."""
        if len(trace_a) != len(trace_b):
            raise ValueError(f"batches {batch_a} and {batch_b} ran different ops "
                             f"({len(trace_a)} and {len(trace_b)})")
        lines = set()
        for a, b in zip(trace_a, trace_b, strict=True):
            per_image = (b - a) / (batch_b - batch_a)
            lines.add((a - batch_a * per_image, per_image))
        return cls(sorted(lines))

    def at(self, micro_batch: int) -> float:
        return max(fixed + micro_batch * per_image for fixed, per_image in self.lines)


def clean_batch(config: AxialTransformerConfig) -> int:
    """The smallest batch whose step takes the model's large-batch code paths. The model scales
    a weight instead of its activations once a batch holds more numbers than the weight
    (attention's projection: 3D x D, the MLP: hidden x D); below that its step saves other
    tensors, so the two batches compared must both be at or above it. And at least 2: at batch 1
    the column attention's fold of (batch, width) into one axis is a view where larger batches
    copy."""
    tokens = config.image_size[0] * config.image_size[1]
    return max(2, math.ceil(max(3 * config.dim, round(config.dim * config.mlp_ratio)) / tokens))


def step_trace(config: AxialTransformerConfig, gc: bool, batch: int) -> LiveTensorBytes:
    """One bf16 training step (forward and backward of the random-channel loss, as training
    takes it) of a model in training mode (dropout masks are saved as on a GPU): what it adds to
    the fp32 model and the batch: gradients, autocast's bf16 weight copies, the activations saved
    for the backward and the kernels' outputs."""
    model = build(config, gc)
    x = torch.randint(0, 256, (batch, config.channels, *config.image_size), dtype=torch.uint8)
    channel = torch.arange(batch) % config.channels
    tensors = LiveTensorBytes([*model.parameters(), *model.buffers(), x, channel])
    with tensors:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(x, "random", channel=channel)
        loss.backward()
    return tensors


def kib_field(path: str, name: str) -> int:
    with open(path) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name))


def memory_cap() -> int:
    """Bytes a case may allocate: what the machine has available now, less 1 GiB for the rest.
    Set as RLIMIT_DATA, an allocation past it fails inside torch (an error the table reports)
    instead of waking the kernel's OOM killer, which could pick another process."""
    return kib_field("/proc/meminfo", "MemAvailable:") - GiB


def memory_section(names: list[str], args: argparse.Namespace) -> dict:
    found, rows = {}, []
    for name in names:
        for gc in (False, True):
            config = preset(name, args.dim)
            b0 = clean_batch(config)
            try:
                start = time.perf_counter()
                a, b = step_trace(config, gc, b0), step_trace(config, gc, b0 + 1)
            except (RuntimeError, MemoryError) as e:
                if isinstance(e, RuntimeError) and "alloc" not in str(e):
                    raise
                rows.append([name, "on" if gc else "off", f"{b0}, {b0 + 1}",
                             "did not fit in this machine's memory", "", *[""] * 3])
                continue
            act = found[name, gc] = Activation.from_traces(a.trace, b0, b.trace, b0 + 1)
            rows.append([name, "on" if gc else "off", f"{b0}, {b0 + 1}",
                         f"{gib(a.peak)}, {gib(b.peak)}", f"{time.perf_counter() - start:.0f}",
                         *(gib(act.at(m)) for m in MICRO_BATCHES)])
    print("## Memory of a bf16 training step (measured on this CPU)")
    print("Forward (bf16 autocast) and backward of the random-channel loss at two batches that "
          "run the same ops. 'tensors' = the peak tensor bytes the step holds alive, counted op "
          "by op (the CPU's torch.cuda.max_memory_allocated). After each op, live bytes = fixed "
          "+ m x per image; the step at micro-batch m takes the highest over its ops.")
    table(["config", "GC", "batches", "tensors GiB", "both steps s",
           *(f"step at m={m} GiB" for m in MICRO_BATCHES)], rows)
    print()
    return found


# ---------------------------------------------------------------------------------------------
# Measured: a checkpoint on disk.


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def checkpoint_section(names: list[str], args: argparse.Namespace) -> None:
    """One checkpoint and the EMA export of each full-size model, written by the training
    code's own `save_checkpoint`."""
    from accelerate import Accelerator

    from axial_transformer.training.ema import EMA
    from axial_transformer.training.resume import save_checkpoint

    rows = []
    for name in names:
        model = AxialTransformer(preset(name, args.dim))
        ema = EMA(model, 0.99995)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # Adam holds its moments once it has stepped; zero gradients move nothing
        with tempfile.TemporaryDirectory(dir=args.work_dir) as run_dir:
            start = time.perf_counter()
            path = save_checkpoint(Accelerator(cpu=True), model, optimizer, ema,
                                   {"step": 1, "skipped_steps": 0}, Path(run_dir), keep=1)
            seconds = time.perf_counter() - start
            checkpoint, export = directory_bytes(path), directory_bytes(Path(run_dir, "export"))
        params = model.num_parameters()
        del model, ema, optimizer
        need, preflight = (KEEP + 1) * checkpoint + export, run_bytes(params, KEEP)
        rows.append([name, f"{params:,}", gib(checkpoint), gib(export), f"{seconds:.0f}",
                     gib(need), f"{gib(preflight)} ({preflight / need:.2f}x)"])
    print("## Checkpoints (measured: written by resume.save_checkpoint, sizes on disk)")
    print(f"Peak disk need at checkpoint.keep={KEEP}: {KEEP + 1} checkpoints (a new one is sealed "
          "before the oldest goes) + the export; startup.run_bytes is what start-up checks for.")
    table(["config", "parameters", "checkpoint GiB", "export GiB", "written in s",
           f"disk need keep={KEEP} GiB", "startup.run_bytes GiB"], rows)
    print()


# ---------------------------------------------------------------------------------------------
# ESTIMATED: memory per GPU and time, from the measurements and the assumptions above.


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
    buckets: the forward and backward's, `step` (Activation.at the micro-batch); and the
    optimizer step's, with the 4 P of gradients and the 4 P square root of Adam's second moments
    that torch's foreach Adam (the GPU's) takes out of place."""
    return states_bytes(params) + ddp_bucket_bytes(params, gpus) + max(step, 8 * params)


def largest_fitting_micro_batch(params: int, step, gpus: int, per_gpu: int) -> int | None:
    """The largest divisor of the per-GPU batch whose step fits (train.grad_accumulation then
    takes per_gpu / it micro-batches per step), or None when not even one image fits; `step`
    gives a micro-batch's step memory."""
    fitting = [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0
               and gpu_memory(params, step(m), gpus) <= GPU_MEMORY - HEADROOM]
    return fitting[0] if fitting else None


def memory_table(params: dict[str, int], activations: dict) -> None:
    print(f"## Memory per GPU at global batch {GLOBAL_BATCH} (ESTIMATED from the measurements; "
          "no GPU has confirmed it)")
    print("total = 16 P (fp32 weights, Adam's moments, EMA, on every GPU under DDP) + 4 P (DDP's "
          "gradient buckets, with more than one GPU) + max(step(m) measured above, 8 P: the "
          "optimizer step's gradients and Adam's out-of-place square root). Fits when total <= "
          f"{(GPU_MEMORY - HEADROOM) / GiB:.0f} GiB of an 80 GiB A100/H100 ({HEADROOM / GiB:.0f} "
          "GiB assumed for the CUDA context, workspaces and fragmentation). Evaluation is not "
          "covered.")
    rows = []
    for (name, gc), act in activations.items():
        p = params[name]
        for gpus in GPU_COUNTS:
            per_gpu = GLOBAL_BATCH // gpus
            m = largest_fitting_micro_batch(p, act.at, gpus, per_gpu)
            verdict = ("fits" if m == per_gpu else "does NOT fit, even at micro-batch 1"
                       if m is None else f"no: train.grad_accumulation={per_gpu // m} "
                       f"(micro-batch {m}, {gpu_memory(p, act.at(m), gpus) / GiB:.1f} GiB)")
            rows.append([name, "on" if gc else "off", gpus, per_gpu,
                         f"{states_bytes(p) / GiB:.1f}", f"{ddp_bucket_bytes(p, gpus) / GiB:.1f}",
                         f"{act.at(per_gpu) / GiB:.1f}",
                         f"{gpu_memory(p, act.at(per_gpu), gpus) / GiB:.1f}", verdict])
    table(["config", "GC", "GPUs", "per GPU", "states GiB", "buckets GiB", "step(m) GiB",
           "total GiB", "fits 80 GiB?"], rows)
    print()


def duration(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def time_table(params: dict[str, int], flops: dict, mfu: float) -> None:
    print(f"## Time per {STEPS:,} steps (ESTIMATED: counted FLOPs at an ASSUMED {mfu:.0%} of "
          "peak; no GPU has confirmed it)")
    print(f"step = max(compute, all-reduce), DDP overlapping the two; compute = {GLOBAL_BATCH} / "
          f"N x executed FLOPs per training image / ({mfu:.0%} x bf16 peak); all-reduce = "
          "2 (N-1)/N x 4 P bytes / bus bandwidth. Peaks: A100 312, H100 SXM 989 TFLOP/s bf16 "
          "dense; 19.5 and 67 TFLOP/s fp32. Bus (assumed): 240 / 360 GB/s within a node, 20 / 40 "
          f"GB/s per GPU across nodes. {mfu:.0%}: a planning figure (well-tuned large runs report "
          "40-55%, PaLM 46%). Each config with its own train.gradient_checkpointing. One "
          "evaluation = the 49,999 test images at the same share of the fp32 peak (eval.bf16="
          "false, the default) or of the bf16 peak (eval.bf16=true).")
    rows = []
    for name, p in params.items():
        gc = trains_with_gc(name)
        per_image = flops[name]["train_gc" if gc else "train"]
        for gpu in GPUS:
            for gpus in GPU_COUNTS:
                compute = GLOBAL_BATCH / gpus * per_image / (gpu.bf16 * mfu)
                bus = gpu.node_bus if gpus <= 8 else gpu.net_bus  # a ring all-reduce
                allreduce = 2 * (gpus - 1) / gpus * 4 * p / bus
                step = max(compute, allreduce)
                evaluation = TEST_IMAGES / gpus * flops[name]["eval"] / mfu
                rows.append([name, "on" if gc else "off", gpu.name, gpus, f"{1e3 * compute:.0f}",
                             f"{1e3 * allreduce:.0f}", f"{1e3 * step:.0f}",
                             duration(STEPS * step), duration(evaluation / gpu.fp32),
                             duration(evaluation / gpu.bf16)])
    table(["config", "GC", "GPU", "GPUs", "compute ms", "all-reduce ms", "step ms",
           f"{STEPS // 1000}k steps", "one eval fp32", "one eval bf16"], rows)
    print()


# ---------------------------------------------------------------------------------------------
# The rehearsal: configs/imagenet32.yaml end to end through the commands a user runs.


def run_stage(command: list[str], args: argparse.Namespace) -> dict:
    """`command` in a fresh process under the memory cap: wall seconds, peak RSS, stdout."""
    cap = memory_cap()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *command], cwd=ROOT, stdout=out, stderr=err,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)))
        _, status, usage = os.wait4(process.pid, 0)  # the rusage of this process alone
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if process.returncode:
            last = (err.read().strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit code {process.returncode}: {last[:160]}"}
        return {"seconds": seconds, "peak": usage.ru_maxrss * 1024, "stdout": out.read()}


def rehearsal_section(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        run = Path(tmp) / "run"
        # The paper config with the built-in images at batch 2, a checkpoint after every step
        # (one kept: a full-size checkpoint is 5 GiB), 4 evaluated images and no sample grid
        # (16 images would take most of an hour); bf16 as on the GPUs the config is for.
        train = ["train.py", "--config", "configs/imagenet32.yaml", "data.spec=builtin",
                 "model.image_size=[32,32]", "data.workers=0", "train.batch_size=2",
                 "checkpoint.every=1", "checkpoint.keep=1", "eval.every=0", "eval.max_images=4",
                 "log.every=1", "log.sample_every=0", f"run_dir={run}", "resume=auto",
                 "train.mixed_precision=bf16", "train.threads=0",
                 *([f"model.dim={QUICK_DIM}"] if args.quick else [])]
        stages = {"train": [*train, "train.steps=3"], "resume": [*train, "train.steps=5"],
                  "evaluate": ["evaluate.py", "--checkpoint", str(run), "--max-images", "4",
                               "--json"],
                  "sample": ["sample.py", "--checkpoint", str(run / "export"), "--num-samples",
                             "1", "--device", "cpu", "--out", f"{tmp}/sample.png"]}
        rows = []
        for stage, command in stages.items():
            print(f"running the rehearsal's {stage} stage ...", file=sys.stderr, flush=True)
            r = run_stage(command, args)
            if "error" in r:
                rows.append([stage, r["error"], "", ""])
                break
            if stage in ("train", "resume"):
                records = read_records(run / "metrics.jsonl")
                start = [rec for rec in records if "start" in rec][-1]
                losses = ", ".join(f"{rec['step']}: {rec['train/loss_bpd']:.4f}" for rec in records
                                   if "train/loss_bpd" in rec and rec["step"] > start["step"])
                final = [rec for rec in records if "eval/bpd" in rec][-1]
                what = (f"{start['parameters']:,} parameters, {start['start']} at step "
                        f"{start['step']}; train loss by step {losses}; final evaluation "
                        f"{final['eval/bpd']:.4f} bits/dim; checkpoint "
                        f"{gib(directory_bytes(run / 'checkpoints'))} GiB")
            elif stage == "evaluate":
                metrics = json.loads(r["stdout"].strip().splitlines()[-1])
                what = f"fp32 bits/dim {metrics['bpd']:.4f} over {metrics['images']} test images"
            else:
                what = "one image from the EMA export"
            rows.append([stage, f"{r['seconds']:.0f}", gib(r["peak"]), what])
    print("## End to end: configs/imagenet32.yaml on this CPU (measured)")
    print("Built-in images at 32x32, batch 2, bf16 autocast, checkpoint.every=1, "
          "checkpoint.keep=1, eval.max_images=4; each stage a fresh process running the command "
          "a user runs. Peak = the stage's ru_maxrss.")
    table(["stage", "wall s", "peak GiB", "what it did"], rows)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["imagenet32", "imagenet64"],
                        choices=["imagenet32", "imagenet64"])
    parser.add_argument("--skip-run", action="store_true", help="tables only: no end-to-end run")
    parser.add_argument("--quick", action="store_true",
                        help=f"width {QUICK_DIM} instead of the paper's: checks the script runs")
    parser.add_argument("--mfu", type=float, default=0.40,
                        help="assumed share of the GPUs' peak FLOP/s reached (default 0.40)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work-dir", default=None,
                        help="where checkpoints are written and removed (default: the temp dir)")
    args = parser.parse_args()
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    args.dim = QUICK_DIM if args.quick else None
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"# Scale rehearsal of the paper configs, "
          f"{machine_line('bf16 autocast, the GPU recipe', args.threads)}, "
          f"{memory_cap() / GiB + 1:.0f} GiB available; no GPU was used"
          + (f"; --quick: width {QUICK_DIM}, the numbers mean nothing" if args.quick else ""))
    print(f"command: python {' '.join(sys.argv)}\n")
    held = kib_field("/proc/self/status", "VmData:")
    resource.setrlimit(resource.RLIMIT_DATA, (held + memory_cap(), resource.RLIM_INFINITY))

    widths = QUICK_FIT_WIDTHS if args.quick else FIT_WIDTHS
    flops, params, rows = {}, {}, []
    for name in args.configs:
        c = preset(name, args.dim)
        with torch.device("meta"):
            params[name] = AxialTransformer(c).num_parameters()
        f = flops[name] = flops_at_width(name, c.dim, widths)
        rows.append([name, "x".join(map(str, (c.channels, *c.image_size))), c.dim,
                     f"{c.encoder_layers}/{c.outer_layers}/{c.inner_layers}", f"{params[name]:,}",
                     f"{f['train'] / 1e9:,.1f}",
                     f"{f['train_gc'] / 1e9:,.1f} ({f['train_gc'] / f['train']:.3f}x)",
                     f"{f['eval'] / 1e9:,.1f}", "yes" if f["exact"] else "NO"])
    print("## FLOPs per image (measured: counted on real steps)")
    print(f"torch.utils.flop_counter on fp32 steps at batch 1, widths {widths[0]} and "
          f"{widths[1]}, scaled to the config's width as a D^2 + b D and checked at width "
          f"{widths[2]}. Train: forward + backward of the random-channel loss; with gradient "
          "checkpointing (GC) the recomputed forward counts. Eval: forward of bits/dim, every "
          "channel. Causal attention counts the t(t+1)/2 pairs it needs.")
    table(["config", "image", "width", "layers", "parameters", "train GFLOP",
           "train with GC GFLOP", "eval GFLOP", f"width {widths[2]} predicted exactly"], rows)
    print()
    checkpoint_section(args.configs, args)
    activations = memory_section(args.configs, args)
    memory_table(params, activations)
    time_table(params, flops, args.mfu)
    if not args.skip_run:
        rehearsal_section(args)
    print(f"bench wall time {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
