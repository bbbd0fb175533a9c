"""Training-step speed and memory of the Axial Transformer against full causal self-attention.

    python bench/model_bench.py                   # the full table: ~10 min on 2 quiet cores
    python bench/model_bench.py --quick           # tiny model and sizes: checks that it runs
    python bench/model_bench.py --threads 8 --sizes 16 32

Both models are the "small" preset's size (width 256, 8 heads, 12 blocks, MLP ratio 1) and score
EVERY channel of RGB images (`loss(x, "all")`), so at equal batch they see the same number of
subpixels per step. It prints:

1. training steps (forward + backward + Adam) of the Axial Transformer and of a GPT-style baseline
   over the C*H*W subpixels flattened in the model's (c, i, j) order: median step time, peak memory
   (`ru_maxrss` of a fresh process per case), model FLOPs and their rate as a fraction of a
   matmul peak measured in the same run, in fp32 and in bf16 autocast;
2. the bf16 speed-up over fp32 from fp32 and bf16 steps taken in turn in one process;
3. the growth exponent of the step time per image against the pixel count (log-log least squares);
4. our row + column attention against `AxialAttention` of the `axial-attention` package.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from machine import in_turn, machine_line, ratio, seconds, table
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.model.attention import AxialSelfAttention
from axial_transformer.model.blocks import MLP
from axial_transformer.precision import bf16_is_fast

CHANNELS = 3
PRESET, QUICK_PRESET = "small", "tiny"
# Default batch: batch x H x W is held at this many pixels (batch 16 at 16x16, 4 at 32x32, 1 at
# 64x64), so the dense FLOPs per step stay equal across sizes and the 64x64 baseline (12,288
# tokens) runs at batch 1.
PIXELS_PER_STEP = 4096
QUICK_PIXELS_PER_STEP = 64


# ------------------------------------------------------------------------------------------------
# The baseline: a plain GPT-style decoder over the flattened subpixels.


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.to_qkv(x), "b t (i n e) -> i b n t e", i=3, n=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(rearrange(out, "b n t e -> b t (n e)"))


class GPTBlock(nn.Module):
    """Pre-LN block with the same MLP (width and activation) as the Axial Transformer's."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads)
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), MLP(dim, max(1, round(dim * mlp_ratio)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class PixelGPT(nn.Module):
    """Full causal self-attention over the C*H*W subpixels in (c, i, j) order.

    Positions are learned and additively factorised (channel + row + column), like the Axial
    Transformer's: a full table would add C*H*W*D parameters (3.1M at 64x64x3, two thirds of the
    model) that cost no compute but would break the parameter match.
    """

    def __init__(self, c: AxialTransformerConfig) -> None:
        super().__init__()
        (height, width), dim = c.image_size, c.dim
        depth = c.encoder_layers + c.outer_layers + c.inner_layers
        self.token_embedding = nn.Embedding(c.levels, dim)
        self.start = nn.Parameter(torch.zeros(dim))  # input at position 0, which has no past
        self.pos_c = nn.Parameter(0.02 * torch.randn(c.channels, 1, 1, dim))
        self.pos_h = nn.Parameter(0.02 * torch.randn(1, height, 1, dim))
        self.pos_w = nn.Parameter(0.02 * torch.randn(1, 1, width, dim))
        self.blocks = nn.ModuleList(GPTBlock(dim, c.heads, c.mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, c.levels)

    def loss(self, x: Tensor) -> Tensor:
        """Mean bits/dim over every subpixel: x [B, C, H, W] integers."""
        tokens = rearrange(x, "b c h w -> b (c h w)").long()
        h = self.token_embedding(tokens[:, :-1])  # teacher forcing: token t sees tokens < t
        h = torch.cat([self.start.expand(h.shape[0], 1, -1), h], dim=1)
        h = h + rearrange(self.pos_c + self.pos_h + self.pos_w, "c h w d -> (c h w) d")
        for block in self.blocks:
            h = block(h)
        logits = self.to_logits(self.final_norm(h)).float()  # cross-entropy in fp32
        return F.cross_entropy(rearrange(logits, "b t v -> b v t"), tokens) / math.log(2)


# ------------------------------------------------------------------------------------------------
# FLOPs (also bench/scale_bench.py's).
#
# FlopCounterMode counts the matmuls, convolutions and attention kernels that actually run
# (2 FLOPs per multiply-add; layer norms, softmax, GELU and Adam are left out). Its table has no
# entry for the CPU flash kernel, which is what SDPA runs here, so we add one. A causal kernel
# computes only the t(t+1)/2 query-key pairs on and below the diagonal, so it counts that share;
# the backward is twice the forward (its recomputation of the scores is not a model FLOP).


def _cpu_flash_flop(query, key, value, dropout_p=0.0, is_causal=False, *args, backward=False,
                    **kwargs) -> int:
    share = (query[2] + 1) / (2 * query[2]) if is_causal else 1
    return round((2 if backward else 1) * sdpa_flop_count(query, key, value) * share)


def _cpu_flash_backward_flop(grad_out, query, key, value, out, logsumexp, dropout_p=0.0,
                             is_causal=False, *args, **kwargs) -> int:
    return _cpu_flash_flop(query, key, value, dropout_p, is_causal, backward=True)


CPU_FLASH_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}


# ------------------------------------------------------------------------------------------------
# The cases, each run in a fresh process (peak memory is per process).


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def training_step(args: argparse.Namespace, variant: str, size: int, batch: int):
    """The case's model and its step(bf16): forward + backward + Adam."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, CHANNELS, size, size), dtype=torch.uint8)
    config = AxialTransformerConfig.from_preset(args.preset, image_size=(size, size),
                                                channels=CHANNELS)
    if variant.startswith("axial"):
        model = AxialTransformer(config)
        loss_fn = lambda x: model.loss(x, "all")
    else:
        model = PixelGPT(config)
        loss_fn = model.loss
    compiled_loss = torch.compile(loss_fn) if variant == "axial compiled" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(bf16: bool, compiled: bool = True) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (compiled_loss if compiled and compiled_loss else loss_fn)(x)
        loss.backward()
        optimizer.step()

    return model, step


def step_case(args: argparse.Namespace, variant: str, precision: str, size: int,
              batch: int) -> dict:
    """One model's training step: model FLOPs (counted on an eager fp32 step, so the same for
    every variant), time and this process's peak memory."""
    base_rss = rss_mib()
    model, step = training_step(args, variant, size, batch)
    counter = FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS)
    with counter:
        step(bf16=False, compiled=False)
    bf16, compile_seconds = precision == "bf16", None
    if variant == "axial compiled":
        start = time.perf_counter()
        step(bf16)  # compiles
        compile_seconds = time.perf_counter() - start
    return dict(params=sum(p.numel() for p in model.parameters()), batch=batch,
                seconds=seconds(lambda: step(bf16), args.min_run_time),
                flops=counter.get_total_flops(), compile_seconds=compile_seconds,
                rss_base_mib=base_rss, rss_peak_mib=rss_mib())


def paired_case(args: argparse.Namespace, variant: str, size: int, batch: int) -> dict:
    """The axial model's fp32 and bf16 steps taken in turn in one process, for the bf16
    speed-up: on a shared machine the speed drifts by 10% or more between processes, and a drift
    hits both precisions of a round alike."""
    _, step = training_step(args, variant, size, batch)
    return in_turn({p: lambda bf16=p == "bf16": step(bf16) for p in ("fp32", "bf16")},
                   args.rounds)


def in_fresh_process(args: argparse.Namespace, case, *case_args) -> dict:
    """`case(args, *case_args)` in a fresh process; {"error": ...} if it fails or times out."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        try:
            return pool.apply_async(case, (args, *case_args)).get(args.case_timeout)
        except multiprocessing.TimeoutError:
            return {"error": f"did not finish in {args.case_timeout:.0f} s"}
        except Exception as e:  # an out-of-memory case is a row of the table, not the end
            return {"error": f"failed: {str(e).splitlines()[0][:120]}"}


# ------------------------------------------------------------------------------------------------
# Layer-level tables.


def matmul_peak(n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n @ n x n matmul."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / seconds(lambda: torch.mm(a, b, out=out), 1.0)


def matmul_bf16_speedup(batches: dict[int, int], args: argparse.Namespace) -> dict[int, float]:
    """bf16 over fp32 speed-up of the dense matmuls of one training step, shape for shape.

    A step is mostly these products (forward, input gradient, weight gradient of every dense
    layer), so their own speed-up bounds what bf16 autocast can give the step when the rest
    (layer norms, softmax, conversions) gains no more than they do.
    """
    dim = 256
    print("## bf16 speed-up of the model's own dense matmuls (forward, input and weight grads)")
    speedups, rows = {}, []
    for size, batch in batches.items():
        tokens = batch * CHANNELS * size * size  # one image per channel scored (a slice)
        ms = {}
        for dtype in (torch.float32, torch.bfloat16):
            ms[dtype] = 0.0
            for width, count in ((3 * dim, 1), (dim, 3)):  # QKV; attention out, MLP in and out
                a = torch.randn(tokens, dim, dtype=dtype)
                w = torch.randn(dim, width, dtype=dtype)
                g = torch.randn(tokens, width, dtype=dtype)
                for product in (lambda: a @ w, lambda: g @ w.T, lambda: a.T @ g):  # noqa: B023
                    ms[dtype] += 1e3 * count * seconds(product, args.min_run_time / 50)
        speedups[size] = ms[torch.float32] / ms[torch.bfloat16]
        rows.append([f"{size}x{size}x{CHANNELS}", f"{tokens:,}", f"{ms[torch.float32]:.1f}",
                     f"{ms[torch.bfloat16]:.1f}", f"{speedups[size]:.2f}x"])
    table(["image", "tokens", "fp32 ms per block", "bf16 ms per block", "speed-up"], rows)
    return speedups


def compare_attention(args: argparse.Namespace, batches: dict[int, int]) -> dict[int, float]:
    """Prints the attention-layer table; returns the package's time over ours by image size."""
    try:
        from axial_attention import AxialAttention
    except ImportError:
        print("## Attention layer: skipped (pip install axial-attention to compare)\n")
        return {}
    print("## Attention layer: unmasked row + column, width 256, 8 heads, forward + backward")
    print("ours = two axial_transformer.model.attention.AxialSelfAttention (row, column), summed; "
          "package = axial_attention.AxialAttention(dim=256, heads=8, dim_index=-1, "
          "sum_axial_out=True); input [B, H, W, 256], fp32")
    torch.manual_seed(0)
    row, column = AxialSelfAttention(256, 8, "row"), AxialSelfAttention(256, 8, "column")
    package = AxialAttention(dim=256, heads=8, dim_index=-1, sum_axial_out=True)
    speedups, rows = {}, []
    for size in args.sizes:
        # B = step batch x channels: what one attention layer of the model sees in a step.
        x = torch.randn(batches[size] * CHANNELS, size, size, 256, requires_grad=True)
        grad = torch.randn_like(x)
        ours = seconds(lambda: (row(x) + column(x)).backward(grad), args.min_run_time)  # noqa: B023
        theirs = seconds(lambda: package(x).backward(grad), args.min_run_time)  # noqa: B023
        speedups[size] = theirs / ours
        rows.append([f"{len(x)}x{size}x{size}x256", f"{1e3 * ours:.2f}", f"{1e3 * theirs:.2f}",
                     f"{theirs / ours:.2f}x"])
    table(["input", "ours ms", "package ms", "speed-up"], rows)
    print()
    return speedups


# ------------------------------------------------------------------------------------------------
# The driver.


def run_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pixels_per_step = QUICK_PIXELS_PER_STEP if args.quick else PIXELS_PER_STEP
    batches = {s: args.batch or max(1, pixels_per_step // (s * s)) for s in args.sizes}
    print(f"# Axial Transformer training-step benchmark, "
          f"{machine_line('fp32 and bf16 autocast, each timed', args.threads)} "
          f"({os.cpu_count()} logical CPUs), load average {os.getloadavg()[0]:.2f}")
    print(f"bf16 on this machine: {bf16_is_fast(torch.device('cpu'))[1]}")
    c = AxialTransformerConfig.from_preset(args.preset)
    print(f"model: preset {args.preset!r} (width {c.dim}, {c.heads} heads, {c.encoder_layers}/"
          f"{c.outer_layers}/{c.inner_layers} layers), RGB, every channel "
          f"scored; step time: median of torch.utils.benchmark's blocked_autorange over "
          f"{args.min_run_time:g} s after a FLOP-counted step and its warm-up"
          + (" (--quick: tiny model and sizes, numbers mean nothing)" if args.quick else ""))
    n = 512 if args.quick else 2048
    peak = {"fp32": matmul_peak(n, torch.float32), "bf16": matmul_peak(n, torch.bfloat16)}
    print(f"matmul peak ({n}x{n} @ {n}x{n}, median over 1 s): fp32 {peak['fp32'] / 1e9:.0f} "
          f"GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s\n")

    variants = ["axial", "axial compiled", "baseline"] if args.compile else ["axial", "baseline"]
    cases = [(m, p) for m in variants for p in ("fp32", "bf16")
             if p in args.precisions and not (m == "baseline" and p == "bf16")]
    results, paired = {}, {}
    for size in args.sizes:
        for variant, precision in cases:
            results[variant, precision, size] = in_fresh_process(
                args, step_case, variant, precision, size, batches[size])
        if {"fp32", "bf16"} <= set(args.precisions):
            for variant in variants[:-1]:
                paired[variant, size] = in_fresh_process(args, paired_case, variant, size,
                                                         batches[size])

    print("## Training step (forward + backward + Adam)")
    print("axial = AxialTransformer; axial compiled = its loss under torch.compile (inductor), "
          "timed after compiling; baseline = GPT over C*H*W tokens, full causal attention "
          f"(SDPA is_causal); all with {c.encoder_layers + c.outer_layers + c.inner_layers} "
          "blocks and the same batch at each size")
    rows = []
    for (variant, precision, size), r in results.items():
        image = f"{size}x{size}x{CHANNELS}"
        if "error" in r:
            rows.append([variant, precision, image, batches[size], "-", r["error"], *[""] * 5])
            continue
        rate = r["flops"] / r["seconds"]
        rows.append([variant, precision, image, r["batch"], f"{r['params']:,}",
                     f"{1e3 * r['seconds']:.1f}", f"{1e3 * r['seconds'] / r['batch']:.1f}",
                     f"{r['rss_peak_mib']:.0f}", f"{r['flops'] / 1e9:.1f}", f"{rate / 1e9:.1f}",
                     f"{100 * rate / peak[precision]:.0f}%"])
    table(["model", "prec", "image", "batch", "params", "step ms", "ms/image", "peak MiB",
           "GFLOP/step", "GFLOP/s", "% matmul peak"], rows)
    ok = {k: r for k, r in results.items() if "error" not in r}
    if ok:
        print(f"peak MiB is ru_maxrss of the case's process, which holds about "
              f"{statistics.median(r['rss_base_mib'] for r in ok.values()):.0f} MiB before the "
              "model is built")
    compile_s = [f"{s}x{s} {p} {r['compile_seconds']:.0f} s" for (_, p, s), r in ok.items()
                 if r["compile_seconds"] is not None]
    if compile_s:
        print(f"compilation (the first compiled step): {', '.join(compile_s)}")
    print("FLOPs: torch.utils.flop_counter on an fp32 step (matmuls, convs, attention; causal "
          "attention counts the pairs at or below the diagonal), the same model FLOPs for every "
          "variant\n")

    if paired:
        print("## bf16 speed-up, fp32 and bf16 steps in turn in one process")
        print("the order swaps every round; speed-up = median over rounds of fp32 / bf16 step "
              "time (range over rounds)")
        table(["model", "image", "batch", "fp32 step ms", "bf16 step ms", "speed-up"],
              [[v, f"{s}x{s}x{CHANNELS}", batches[s], *([r["error"], "", ""] if "error" in r else
               [f"{1e3 * statistics.median(r['fp32']):.1f}",
                f"{1e3 * statistics.median(r['bf16']):.1f}", ratio(r["bf16"], r["fp32"])])]
               for (v, s), r in paired.items()])
        print()
    bound = matmul_bf16_speedup(batches, args)
    print()
    layer_speedups = compare_attention(args, batches)

    per_image = lambda k: ok[k]["seconds"] / ok[k]["batch"]
    verdict = lambda met: "met" if met else "NOT met"
    print("## Summary (targets are for a quiet machine)")
    for variant, precision in cases:
        points = [(s * s, per_image((variant, precision, s))) for s in args.sizes
                  if (variant, precision, s) in ok]
        if len(points) > 1:
            fit = statistics.linear_regression(*zip(*((math.log(p), math.log(t))
                                                       for p, t in points), strict=True))
            print(f"growth exponent of step time per image vs pixels, {variant} {precision}: "
                  f"{fit.slope:.2f}")
    for size in args.sizes:
        image = f"{size}x{size}x{CHANNELS}"
        if {("axial", "fp32", size), ("baseline", "fp32", size)} <= ok.keys():
            speedup = per_image(("baseline", "fp32", size)) / per_image(("axial", "fp32", size))
            target = f" (target at 64x64x3: >= 4x, {verdict(speedup >= 4)})" if size == 64 else ""
            print(f"{image}: axial step speed-up over the baseline {speedup:.2f}x (fp32, per "
                  f"image){target}")
        for variant in variants[:-1]:
            if (variant, "fp32", size) in ok:
                r = ok[variant, "fp32", size]
                share = r["flops"] / r["seconds"] / peak["fp32"]
                print(f"{image}: {variant} fp32 step at {100 * share:.0f}% of the fp32 matmul "
                      f"peak (target >= 65%, {verdict(share >= 0.65)})")
            r = paired.get((variant, size), {})
            if "fp32" in r:
                speedup = statistics.median(a / b for a, b in zip(r["fp32"], r["bf16"],
                                                                   strict=True))
                print(f"{image}: {variant} bf16 step speed-up over fp32 {speedup:.2f}x, steps in "
                      f"turn (target >= 2x, {verdict(speedup >= 2)}; this model's matmuls alone: "
                      f"{bound[size]:.2f}x)")
        if size in layer_speedups:
            print(f"{image}: our row + column attention's speed-up over axial-attention's "
                  f"{layer_speedups[size]:.2f}x (target > 1x, {verdict(layer_speedups[size] > 1)})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"the {QUICK_PRESET!r} preset at tiny sizes, short timings: checks "
                        "that the script runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="square image sizes (default 16 32 64; --quick: 4 8)")
    parser.add_argument("--batch", type=int,
                        help=f"batch at every size (default: {PIXELS_PER_STEP} pixels per step)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"], help="bf16 = torch.autocast('cpu', bfloat16)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the axial model's step under torch.compile (minutes of "
                        "compilation per case)")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds of timing per case (default 15; --quick: 0)")
    parser.add_argument("--rounds", type=int, help="rounds of fp32 and bf16 steps in turn "
                        "(default 7; --quick: 2)")
    parser.add_argument("--case-timeout", type=float, default=1200.0,
                        help="seconds before a case counts as not fitting in time")
    args = parser.parse_args()
    args.preset = QUICK_PRESET if args.quick else PRESET
    args.sizes = args.sizes or ([4, 8] if args.quick else [16, 32, 64])
    args.min_run_time = args.min_run_time if args.min_run_time is not None else (
        0.0 if args.quick else 15.0)
    args.rounds = args.rounds or (2 if args.quick else 7)
    for name in ("threads", "rounds", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.min_run_time < 0 or any(s < 1 for s in args.sizes):
        parser.error("--min-run-time must be 0 or more and --sizes positive")
    return args


if __name__ == "__main__":
    run_bench(parse_args())
