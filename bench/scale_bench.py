"""Will the paper's configs run on my GPUs? A scale rehearsal of imagenet32 and imagenet64.

    python bench/scale_bench.py                  # everything, about 25 minutes on 2 quiet cores
    python bench/scale_bench.py --skip-run       # the tables only, without the end-to-end run
    python bench/scale_bench.py --quick          # width 32: checks the script runs; numbers mean
                                                 # nothing
    python bench/scale_bench.py --configs imagenet64 --mfu 0.35

For each paper config at full size it MEASURES, on this CPU: the parameters; the model FLOPs
per training image (random-channel objective) and per evaluated image, counted on real steps
(scale_cases.py); a checkpoint and export written by the training code; and the memory a bf16
training step adds, op by op at two batches, with and without gradient checkpointing. From
these it DERIVES, with the formulas printed beside them, the memory per GPU at batch 64 over 1,
8 and 64 GPUs and the time per 100k steps on A100s and H100s at an assumed share of their peak.
Then it runs the imagenet32 config end to end on this CPU (scale_rehearsal.py). Every
measurement runs in a fresh process, capped below the memory available so that a case that does
not fit fails in torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from machine import machine_line
from scale_cases import FIT_WIDTHS, QUICK_DIM, QUICK_FIT_WIDTHS, flops_at_width, preset
from scale_plan import GLOBAL_BATCH, Activation, GiB, derived_tables, print_table
from scale_rehearsal import STAGES

from axial_transformer.training.startup import run_bytes

HERE = Path(__file__).resolve().parent
KEEP = 3  # checkpoint.keep in both paper configs
MICRO_BATCHES = (1, 8, 64)  # the per-GPU batches at global batch 64 on 64, 8 and 1 GPUs


@dataclass
class DeeperActivation:
    """A full-depth step's memory from steps at 2 and 4 layers per stack, linear in depth
    (every block of a stack holds the same activations, and the three stacks grow together)."""

    shallow: Activation
    deeper: Activation
    steps: float  # from 2 layers to the config's, in steps of 2
    how: str

    def at(self, micro_batch: int) -> float:
        a = self.shallow.at(micro_batch)
        return a + self.steps * (self.deeper.at(micro_batch) - a)


def memory_cap() -> int:
    """Bytes a case may use: what the machine has available now, less 1 GiB for the rest."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f
                          if line.startswith("MemAvailable:"))
    return available - GiB


def spawn(script: str, arguments: list[str], label: str, args: argparse.Namespace) -> dict:
    """Run `script` (in bench/) in a fresh process under the memory cap; its last JSON line."""
    cap = memory_cap()
    command = [sys.executable, str(HERE / script), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"running {label} ...", file=sys.stderr, flush=True)
    try:
        # RLIMIT_DATA: an allocation past the cap fails inside torch (an error the case reports)
        # instead of waking the kernel's OOM killer, which could pick another process.
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=args.case_timeout, preexec_fn=lambda: resource.setrlimit(
                                  resource.RLIMIT_DATA, (cap, cap)))
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {args.case_timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit code {done.returncode}: {last[:160]}"}
    return json.loads(lines[-1])


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


# ---------------------------------------------------------------------------------------------
# Measured: FLOPs, checkpoints, activation memory.


def flops_section(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    widths = QUICK_FIT_WIDTHS if args.quick else FIT_WIDTHS
    flops, rows = {}, []
    for name in names:
        print(f"counting FLOPs of {name} at widths {widths} ...", file=sys.stderr, flush=True)
        config = preset(name, args.dim)
        f = flops_at_width(name, config.dim, widths)
        exact = all(f[f"{k}_exact"] for k in ("train", "train_gc", "eval"))
        flops[name] = {**f, "exact": exact}
        rows.append([name, "x".join(map(str, (config.channels, *config.image_size))),
                     str(config.dim), f"{config.encoder_layers}/{config.outer_layers}/"
                     f"{config.inner_layers}", f"{f['train'] / 1e9:,.1f}",
                     f"{f['train_gc'] / 1e9:,.1f} ({f['train_gc'] / f['train']:.3f}x)",
                     f"{f['eval'] / 1e9:,.1f}", "yes" if exact else "NO"])
    print("## FLOPs per image (measured: counted on real steps)")
    print(f"torch.utils.flop_counter on fp32 steps of the model's attention=\"sdpa\" path at "
          f"batch 1, widths {widths[0]} and {widths[1]}, scaled to the config's width as "
          f"a D^2 + b D (dense layers ~ D^2; convolution, logits and attention ~ D), and checked "
          f"against a count at width {widths[2]}. Train: forward + backward of the "
          "random-channel loss (one channel slice per image); with gradient checkpointing "
          "(GC) the recomputed forward is counted as executed. Eval: forward of bits/dim, "
          "every channel. Causal attention counts the t(t+1)/2 pairs it needs.")
    print_table(["config", "image", "width", "layers", "train GFLOP", "train with GC GFLOP",
                 "eval GFLOP", f"width {widths[2]} predicted exactly"], rows)
    return flops


def checkpoint_section(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    sizes, rows = {}, []
    for name in names:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            r = spawn("scale_cases.py", ["--case", "checkpoint", "--config", name, "--dir", tmp,
                                         *dim_args(args)], f"{name} checkpoint", args)
        sizes[name] = r
        if "error" in r:
            rows.append([name, r["error"], *[""] * 5])
            continue
        need = (KEEP + 1) * r["checkpoint"] + r["export"]
        preflight_need = run_bytes(r["params"], KEEP)
        rows.append([name, f"{r['params']:,}", gib(r["checkpoint"]), gib(r["export"]),
                     f"{r['seconds']:.0f}", gib(need),
                     f"{gib(preflight_need)} ({preflight_need / need:.2f}x)"])
    print("## Checkpoints (measured: written by resume.save_checkpoint, sizes on disk)")
    print("A checkpoint holds fp32 weights, Adam's two moments, the EMA, generator states and "
          f"JSON; the export the EMA weights. The run's peak disk need at checkpoint.keep={KEEP} "
          f"is {KEEP + 1} checkpoints (a new one is sealed before the oldest goes) + the export; "
          "preflight.run_bytes is what start-up checks for.")
    print_table(["config", "parameters", "checkpoint GiB", "export GiB", "written in s",
                 f"disk need keep={KEEP} GiB", "preflight.run_bytes GiB"], rows)
    return sizes


def dim_args(args: argparse.Namespace) -> list[str]:
    return ["--dim", str(args.dim)] if args.dim else []


def clean_batch(name: str, args: argparse.Namespace) -> int:
    """The smallest batch whose step takes the model's large-batch code paths. The model scales
    a weight instead of its activations once a batch holds more numbers than the weight
    (attention.py's project: 3D x D, model.py's MLP: hidden x D); below that its step saves
    other tensors, so the two batches compared must both be at or above it. And at least 2:
    at batch 1 the column attention's fold of (batch, width) into one axis is a view where larger
    batches copy."""
    config = preset(name, args.dim)
    tokens = config.image_size[0] * config.image_size[1]
    return max(2, math.ceil(max(3 * config.dim, round(config.dim * config.mlp_ratio)) / tokens))


def step_memory(name: str, gc: bool, layers: int | None, args: argparse.Namespace
                ) -> tuple[Activation | None, list[list[str]]]:
    """Activation from steps at two consecutive clean batches, and their table rows."""
    b0 = clean_batch(name, args)
    runs, rows = {}, []
    for batch in (b0, b0 + 1):
        extra = [*dim_args(args), *(["--gc"] if gc else []),
                 *(["--layers", str(layers)] if layers else [])]
        label = f"{name} step memory, GC {'on' if gc else 'off'}, batch {batch}" + (
            f", {layers}/{layers}/{layers} layers" if layers else "")
        r = spawn("scale_cases.py", ["--case", "memory", "--config", name, "--batch",
                                     str(batch), *extra], label, args)
        depth = f"{layers}/{layers}/{layers}" if layers else "full"
        if "error" in r:
            rows.append([name, "on" if gc else "off", depth, str(batch), r["error"], "", "", ""])
            return None, rows
        runs[batch] = r
        rows.append([name, "on" if gc else "off", depth, str(batch), gib(r["tensors"]),
                     gib(r["rss"]), f"{r['seconds']:.0f}", gib(r["peak"])])
    rss = runs[b0 + 1]["rss"] - runs[b0]["rss"]
    how = (f"measured, op by op from batches {b0} and {b0 + 1} (peak RSS per image: "
           f"{gib(rss)})")
    return Activation.from_traces(runs[b0]["trace"], b0, runs[b0 + 1]["trace"], b0 + 1,
                                  how), rows


def memory_section(names: list[str], args: argparse.Namespace
                   ) -> dict[tuple[str, bool], Activation | DeeperActivation]:
    """Full size where it fits in this machine's memory; where it does not, the same width and
    image size at 2 and 4 layers per stack, extrapolated linearly in depth (DeeperActivation)."""
    found, rows, notes = {}, [], []
    for name in names:
        for gc in (False, True):
            activation, new_rows = step_memory(name, gc, None, args)
            rows += new_rows
            if activation is None:
                layers = preset(name, args.dim).inner_layers
                shallow, rows_2 = step_memory(name, gc, 2, args)
                deeper, rows_4 = step_memory(name, gc, 4, args)
                rows += rows_2 + rows_4
                if shallow is None or deeper is None:
                    continue
                steps = layers / 2 - 1
                activation = DeeperActivation(
                    shallow, deeper, steps, f"DERIVED: full depth did not fit; a({layers}) = "
                    f"a(2) + {steps:g} (a(4) - a(2)) from 2 and 4 layers per stack")
            found[name, gc] = activation
            notes.append([name, "on" if gc else "off",
                          *(gib(activation.at(m)) for m in MICRO_BATCHES), activation.how])
    print("## Memory of a bf16 training step (measured on this CPU)")
    print("A fresh process per row builds the fp32 model (attention=\"sdpa\", what GPUs run) and "
          "takes one forward (torch.autocast(\"cpu\", bfloat16)) and backward of the "
          "random-channel loss. 'tensors' = the peak of the tensor bytes the step holds alive "
          "(gradients, autocast's bf16 weight copies, saved activations, outputs), counted op by "
          "op by a TorchDispatchMode: the CPU's counterpart of torch.cuda.max_memory_allocated, "
          "and what the figures below use. 'RSS' = the process's peak resident memory during "
          "the step minus its RSS just before (glibc set to map every block of 1 MiB or more "
          "apart), a cross-check that includes the allocator and the kernels' scratch. The step "
          "at micro-batch m: two batches that run the same ops (scale_bench.clean_batch) give, "
          "after each op, live bytes = fixed + m x per image; the step takes the highest over its "
          "ops. (The peak's op moves with m: with gradient checkpointing a few images peak at "
          "the end of the backward, where every gradient is alive, and 64 at the end of the "
          "forward; one line through the two batches' peaks would miss that.)")
    print_table(["config", "GC", "layers", "batch", "tensors GiB", "RSS GiB", "step s",
                 "process peak GiB"], rows)
    print_table(["config", "GC", *(f"step at m={m} GiB" for m in MICRO_BATCHES), "how"], notes)
    return found


# ---------------------------------------------------------------------------------------------
# The end-to-end run.


def rehearsal_section(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        run_dir = str(Path(tmp) / "run")
        results = {}
        for stage in STAGES:
            results[stage] = spawn("scale_rehearsal.py", ["--stage", stage, "--run-dir", run_dir,
                                                          *(["--quick"] if args.quick else [])],
                                   f"rehearsal: {stage}", args)
            if "error" in results[stage]:
                break
    print("## End to end: configs/imagenet32.yaml on this CPU (measured)")
    print("Built-in images at 32x32, batch 2, bf16 autocast (the config's), checkpoint.every=1, "
          "checkpoint.keep=1, eval.max_images=4; one fresh process per stage (bench/"
          "scale_rehearsal.py). Peak = ru_maxrss of the stage's process.")
    rows = []
    for stage, r in results.items():
        if "error" in r:
            rows.append([stage, r["error"], "", ""])
            continue
        rows.append([stage, f"{r['seconds']:.0f}", gib(r["peak"]), describe(stage, r)])
    print_table(["stage", "wall s", "peak GiB", "what it did"], rows)


def describe(stage: str, r: dict) -> str:
    if stage == "evaluate":
        return f"fp32 bits/dim {r['eval_bpd']:.4f} over {r['eval_images']} test images"
    if stage == "sample":
        return f"one image {r['dtype']} {r['shape']}, mean pixel {r['mean_pixel']:.1f}"
    t = r["times"]
    each = lambda key: ", ".join(f"{s:.0f}" for s in t.get(key, [])) or "-"
    losses = ", ".join(f"{step}: {loss:.4f}" for step, loss in r["losses"].items())
    return (f"{r['params']:,} parameters, {r['started']}; steps {each('optimizer_step')} s; "
            f"checkpoint writes {each('save_checkpoint')} s (each {gib(r['checkpoint_bytes'])} "
            f"GiB); checkpoint read {each('select_checkpoint')} s, restore {each('restore')} s; "
            f"final evaluation {each('eval_record')} s, bits/dim {r['eval_bpd']:.4f} over "
            f"{r['eval_images']} images; train loss by step {losses}")


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--case-timeout", type=float, default=3600.0)
    args = parser.parse_args()
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    args.dim = QUICK_DIM if args.quick else None
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024
    print(f"# Scale rehearsal of the paper configs, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine_line('bf16 autocast, the GPU recipe', args.threads)} "
          f"({os.cpu_count()} logical CPUs), {ram / GiB:.0f} GiB RAM, load average "
          f"{os.getloadavg()[0]:.2f}; no GPU was used")
    print(f"python "
          f"{platform.python_version()}" + (f"; --quick: width {QUICK_DIM}, the numbers mean "
                                            "nothing" if args.quick else ""))
    print()
    flops = flops_section(args.configs, args)
    checkpoints = checkpoint_section(args.configs, args)
    activations = memory_section(args.configs, args)
    configs = {name: preset(name, args.dim) for name in args.configs}
    derived_tables(configs, flops, activations, args.mfu)
    if not args.skip_run:
        rehearsal_section(args)
    print(f"global batch {GLOBAL_BATCH}; checkpoints measured: "
          f"{', '.join(n for n, c in checkpoints.items() if 'error' not in c) or 'none'}; "
          f"bench wall time {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
