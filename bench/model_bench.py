"""Training-step speed and memory of the Axial Transformer against full causal self-attention.

    python bench/model_bench.py                   # the full table: ~10 min on 2 quiet cores
    python bench/model_bench.py --quick           # tiny sizes, ~30 s: checks that the script runs
    python bench/model_bench.py --threads 8 --sizes 16 32

Both models are the "small" preset's size (width 256, 8 heads, 12 blocks, MLP ratio 1) and score
EVERY channel of RGB images (`loss(x, "all")`), so at equal batch they see the same number of
subpixels per step. It prints:

1. training steps (forward + backward + Adam) of the Axial Transformer and of a GPT-style baseline
   over the C*H*W subpixels flattened in the model's (c, i, j) order: median step time, peak memory
   (`ru_maxrss` of a fresh subprocess per case), model FLOPs and their rate as a fraction of a
   matmul peak measured in the same run, in fp32 and in bf16 autocast;
2. the bf16 speed-up over fp32 from fp32 and bf16 steps taken in turn in one process;
3. the growth exponent of the step time per image against the pixel count (log-log least squares);
4. our row + column attention against `AxialAttention` of the `axial-attention` package.

Each case runs in a fresh process as `python bench/model_bench.py --case step|paired ...` and prints
one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from machine import machine_line
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.model.attention import AxialSelfAttention
from axial_transformer.model.blocks import MLP
from axial_transformer.precision import bf16_is_fast

CHANNELS = 3
PRESET = "small"
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
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.to_out(rearrange(out, "b n t e -> b t (n e)"))


class GPTBlock(nn.Module):
    """Pre-LN block with the same MLP (width and activation) as the Axial Transformer's."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class PixelGPT(nn.Module):
    """Full causal self-attention over the C*H*W subpixels in (c, i, j) order.

    Positions are learned and additively factorised (channel + row + column), like the Axial
    Transformer's: a full table would add C*H*W*D parameters (3.1M at 64x64x3, two thirds of the
    model) that cost no compute but would break the parameter match.
    """

    def __init__(self, config: AxialTransformerConfig) -> None:
        super().__init__()
        c = config
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
        nats = F.cross_entropy(rearrange(logits, "b t v -> b v t"), tokens)
        return nats / math.log(2)


def build_model(name: str, size: int) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    config = AxialTransformerConfig.from_preset(PRESET, image_size=(size, size),
                                                channels=CHANNELS)
    if name == "axial":
        model = AxialTransformer(config)
        return model, lambda x: model.loss(x, "all")
    model = PixelGPT(config)
    return model, model.loss


# ------------------------------------------------------------------------------------------------
# FLOPs.
#
# FlopCounterMode counts the matmuls, convolutions and attention kernels that actually run
# (2 FLOPs per multiply-add; layer norms, softmax, GELU and Adam are left out). For a dense layer
# that is 6 * weights * tokens per training step; attention adds 4 * t * D per token and layer
# forward (scores and values over the attended axis of length t) and twice that backward. Its
# table has no entry for the CPU flash kernel, which is what SDPA runs here, so we add one. A
# causal kernel computes only the t(t+1)/2 query-key pairs on and below the diagonal, so it counts
# that share; the backward's recomputation of the scores is not counted (model FLOPs).


def _causal_share(seq_len: int, is_causal: bool) -> float:
    return (seq_len + 1) / (2 * seq_len) if is_causal else 1.0


def _cpu_flash_flop(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                    **kwargs) -> int:
    full = sdpa_flop_count(query, key, value)
    return round(full * _causal_share(query[2], is_causal))


def _cpu_flash_backward_flop(grad_out, query, key, value, out, logsumexp, dropout_p=0.0,
                             is_causal=False, *args, out_shape=None, **kwargs) -> int:
    full = 2 * sdpa_flop_count(query, key, value)  # grads of both operands of both matmuls
    return round(full * _causal_share(query[2], is_causal))


CPU_FLASH_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}


# ------------------------------------------------------------------------------------------------
# Timing.


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float) -> float:
    """Median wall time of `fn` after `warmup` calls; stops early (after 3) past `budget_s`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def training_step(args: argparse.Namespace, model_name: str) -> tuple[nn.Module, Callable]:
    """The case's model and its step(bf16, compiled=False): forward + backward + Adam."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, CHANNELS, args.size, args.size), dtype=torch.uint8)
    model, loss_fn = build_model(model_name, args.size)
    compiled_loss = torch.compile(loss_fn) if args.compile else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(bf16: bool, compiled: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (compiled_loss if compiled else loss_fn)(x)
        loss.backward()
        optimizer.step()

    return model, step


def run_step_case(args: argparse.Namespace) -> dict:
    """One training-step case, in this (fresh) process."""
    base_rss = rss_mib()
    model, step = training_step(args, args.model)

    # Model FLOPs, the same whatever runs the attention: counted on an fp32 step through SDPA,
    # whose causal kernels count only the query-key pairs they need. The plain-matmul attention
    # used for short axes computes the masked half too; that work is not credited.
    layers = [m for m in model.modules() if isinstance(m, AxialSelfAttention)]
    paths = [layer.path for layer in layers]
    for layer in layers:
        layer.path = "sdpa"
    counter = FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS)
    with counter:
        step(bf16=False)
    for layer, path in zip(layers, paths, strict=True):
        layer.path = path

    bf16 = args.precision == "bf16"
    if args.compile:
        start = time.perf_counter()
        step(bf16, compiled=True)  # compiles
        compile_seconds = time.perf_counter() - start
    seconds = median_seconds(lambda: step(bf16, args.compile), args.warmup, args.repeats,
                             args.budget)
    return dict(model=args.model, precision=args.precision, size=args.size, batch=args.batch,
                compiled=args.compile, params=sum(p.numel() for p in model.parameters()),
                seconds=seconds, flops=counter.get_total_flops(),
                compile_seconds=compile_seconds if args.compile else None,
                rss_base_mib=base_rss, rss_peak_mib=rss_mib(), threads=torch.get_num_threads())


def run_paired_case(args: argparse.Namespace) -> dict:
    """The model's fp32 and bf16 steps (`--precision` is not used) taken in turn in one process,
    the order swapped every round, for the bf16 speed-up: on a shared machine the speed drifts by
    10% or more between processes, and a drift hits both precisions of a round alike."""
    _, step = training_step(args, args.model)
    for bf16 in (False, True):
        for _ in range(1 + args.warmup):  # the first compiles, under either autocast state
            step(bf16, args.compile)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        for bf16 in (False, True) if i % 2 else (True, False):
            start = time.perf_counter()
            step(bf16, args.compile)
            times[bf16].append(time.perf_counter() - start)
    ratios = [fp32 / bf16 for fp32, bf16 in zip(times[False], times[True], strict=True)]
    return dict(size=args.size, batch=args.batch, compiled=args.compile,
                fp32_seconds=statistics.median(times[False]),
                bf16_seconds=statistics.median(times[True]), speedup=statistics.median(ratios),
                speedup_range=(min(ratios), max(ratios)))


def matmul_peak(n: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of an n x n @ n x n matmul: the best of `repeats`, since it is a peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def attention_seconds(size: int, batch: int, warmup: int, repeats: int, budget: float) -> dict:
    """Forward + backward of unmasked row + column attention, ours and the package's."""
    from axial_attention import AxialAttention

    dim, heads = 256, 8
    torch.manual_seed(0)
    row = AxialSelfAttention(dim, heads, "row")
    column = AxialSelfAttention(dim, heads, "column")
    # sum_axial_out=True: row and column attention of the same input, summed, as below.
    package = AxialAttention(dim=dim, heads=heads, dim_index=-1, sum_axial_out=True)
    x = torch.randn(batch, size, size, dim, requires_grad=True)  # channels last [B, H, W, D]
    grad = torch.randn_like(x)

    def fwd_bwd(forward: Callable[[Tensor], Tensor], params: list[nn.Parameter]) -> None:
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad)

    ours_params = [*row.parameters(), *column.parameters()]
    ours = median_seconds(lambda: fwd_bwd(lambda t: row(t) + column(t), ours_params),
                          warmup, repeats, budget)
    theirs = median_seconds(lambda: fwd_bwd(package, list(package.parameters())),
                            warmup, repeats, budget)
    return dict(size=size, batch=batch, ours=ours, package=theirs)


# ------------------------------------------------------------------------------------------------
# The driver: machine info, subprocess per step case, tables.




def spawn_step_case(model: str, precision: str, size: int, batch: int,
                    args: argparse.Namespace, case: str = "step") -> dict:
    """`model` is "axial", "axial compiled" (torch.compile'd loss) or "baseline"; `case` "step"
    times one precision, "paired" both (run_paired_case)."""
    name, *compiled = model.split()
    command = [sys.executable, os.path.abspath(__file__), "--case", case, "--model", name,
               "--precision", precision, "--size", str(size), "--batch", str(batch),
               "--threads", str(args.threads), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--budget", str(args.budget),
               *(["--compile"] if compiled else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    label = (f"{model} {precision if case == 'step' else 'fp32 and bf16 in turn'} "
             f"{size}x{size}x{CHANNELS} batch {batch}")
    print(f"running {label} ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"did not finish in {args.case_timeout:.0f} s")
    if done.returncode != 0:
        if done.returncode == -9:
            return dict(error="killed (out of memory?)")
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"failed: {last[:120]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
    print(fmt(header))
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for r in rows:
        print(fmt(r))


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    """Slope of log(seconds per image) against log(pixels), least squares."""
    if len(points) < 2:
        return None
    fit = statistics.linear_regression([math.log(p) for p, _ in points],
                                       [math.log(s) for _, s in points])
    return fit.slope


def run_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pixels_per_step = QUICK_PIXELS_PER_STEP if args.quick else PIXELS_PER_STEP
    batches = {s: args.batch or max(1, pixels_per_step // (s * s)) for s in args.sizes}

    print(f"# Axial Transformer training-step benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"CPU: {machine_line('fp32 and bf16 autocast, each timed', args.threads)} "
          f"({os.cpu_count()} logical CPUs), load average {os.getloadavg()[0]:.2f}")
    print(f"bf16 on this machine: {bf16_is_fast(torch.device('cpu'))[1]}; python "
          f"{platform.python_version()}")
    print(f"model: preset {PRESET!r} (width 256, 8 heads, 4/4/4 layers), RGB, every channel "
          f"scored; median of up to {args.repeats} steps after {args.warmup + 1} warm-up"
          + (" (--quick: tiny sizes, numbers mean nothing)" if args.quick else ""))
    print()

    n = 512 if args.quick else 2048
    peak = {"fp32": matmul_peak(n, torch.float32, 3 if args.quick else 10),
            "bf16": matmul_peak(n, torch.bfloat16, 3 if args.quick else 10)}
    print(f"matmul peak ({n}x{n} @ {n}x{n}, best of repeats): fp32 {peak['fp32'] / 1e9:.0f} "
          f"GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print()

    variants = ["axial", "axial compiled", "baseline"] if args.compile else ["axial", "baseline"]
    cases = [(m, p) for m in variants for p in ("fp32", "bf16")
             if p in args.precisions and not (m == "baseline" and p == "bf16")]
    results: dict[tuple[str, str, int], dict] = {}
    paired: dict[tuple[str, int], dict] = {}
    for size in args.sizes:
        for model, precision in cases:
            results[model, precision, size] = spawn_step_case(model, precision, size,
                                                              batches[size], args)
        if {"fp32", "bf16"} <= set(args.precisions):
            for model in variants[:-1]:
                paired[model, size] = spawn_step_case(model, "fp32", size, batches[size], args,
                                                      case="paired")

    print("## Training step (forward + backward + Adam)")
    print("axial = AxialTransformer; axial compiled = its loss under torch.compile (inductor), "
          "timed after compiling; baseline = GPT over C*H*W tokens, full causal attention "
          "(SDPA is_causal); all with 12 blocks and the same batch at each size")
    for size, batch in batches.items():
        if batch == 1:
            print(f"{size}x{size}x{CHANNELS} runs at batch 1: the baseline attends over "
                  f"{CHANNELS * size * size:,} tokens")
    header = ["model", "prec", "image", "batch", "params", "step ms", "ms/image", "peak MiB",
              "GFLOP/step", "GFLOP/s", "% matmul peak"]
    rows = []
    for (model, precision, size), r in results.items():
        image = f"{size}x{size}x{CHANNELS}"
        if "error" in r:
            rows.append([model, precision, image, str(batches[size]), "-", r["error"], *[""] * 5])
            continue
        rate = r["flops"] / r["seconds"]
        rows.append([model, precision, image, str(r["batch"]), f"{r['params']:,}",
                     f"{1e3 * r['seconds']:.1f}", f"{1e3 * r['seconds'] / r['batch']:.1f}",
                     f"{r['rss_peak_mib']:.0f}", f"{r['flops'] / 1e9:.1f}",
                     f"{rate / 1e9:.1f}", f"{100 * rate / peak[precision]:.0f}%"])
    print_table(header, rows)
    base_rss = [r["rss_base_mib"] for r in results.values() if "rss_base_mib" in r]
    if base_rss:
        print(f"peak MiB is ru_maxrss of the case's process, which holds about "
              f"{statistics.median(base_rss):.0f} MiB before the model is built")
    compile_s = [f"{s}x{s} {p} {r['compile_seconds']:.0f} s" for (m, p, s), r in results.items()
                 if r.get("compile_seconds") is not None]
    if compile_s:
        print(f"compilation (the first compiled step): {', '.join(compile_s)}")
    print("FLOPs: torch.utils.flop_counter on an fp32 step with SDPA attention (matmuls, convs, "
          "attention; causal attention counts the pairs at or below the diagonal), the same "
          "model FLOPs for every variant")
    print()

    if paired:
        print_paired(paired)
        print()
    bound = matmul_bf16_speedup(batches, args)
    print()
    layer_times = compare_attention(args, batches)

    ok = lambda *keys: all(k in results and "error" not in results[k] for k in keys)
    per_image = lambda k: results[k]["seconds"] / results[k]["batch"]
    verdict = lambda met: "met" if met else "NOT met"
    print("## Summary (targets are for a quiet machine)")
    for model, precision in cases:
        points = [(s * s, per_image((model, precision, s))) for s in args.sizes
                  if ok((model, precision, s))]
        slope = growth_exponent(points)
        if slope is not None:
            print(f"growth exponent of step time per image vs pixels, {model} {precision}: "
                  f"{slope:.2f}")
    for size in args.sizes:
        image = f"{size}x{size}x{CHANNELS}"
        if ok(("axial", "fp32", size), ("baseline", "fp32", size)):
            ratio = per_image(("baseline", "fp32", size)) / per_image(("axial", "fp32", size))
            target = f" (target at 64x64x3: >= 4x, {verdict(ratio >= 4)})" if size == 64 else ""
            print(f"{image}: axial step speed-up over the baseline {ratio:.2f}x (fp32, per "
                  f"image){target}")
        for model in variants[:-1]:
            if ok((model, "fp32", size)):
                r = results[model, "fp32", size]
                share = r["flops"] / r["seconds"] / peak["fp32"]
                print(f"{image}: {model} fp32 step at {100 * share:.0f}% of the fp32 matmul "
                      f"peak (target >= 65%, {verdict(share >= 0.65)})")
            if "speedup" in paired.get((model, size), {}):
                ratio = paired[model, size]["speedup"]
                apart = ""
                if ok((model, "fp32", size), (model, "bf16", size)):
                    fp32, bf16 = (per_image((model, p, size)) for p in ("fp32", "bf16"))
                    apart = f"; from the separate processes above {fp32 / bf16:.2f}x"
                print(f"{image}: {model} bf16 step speed-up over fp32 {ratio:.2f}x, steps in "
                      f"turn (target >= 2x, {verdict(ratio >= 2)}; this model's matmuls alone: "
                      f"{bound[size]:.2f}x{apart})")
        if size in layer_times:
            ratio = layer_times[size]["package"] / layer_times[size]["ours"]
            print(f"{image}: our row + column attention's speed-up over axial-attention's "
                  f"{ratio:.2f}x (target > 1x, {verdict(ratio > 1)})")


def print_paired(paired: dict[tuple[str, int], dict]) -> None:
    print("## bf16 speed-up, fp32 and bf16 steps in turn in one process")
    print("the order swaps every round; speed-up = median over rounds of fp32 / bf16 step time")
    rows = []
    for (model, size), r in paired.items():
        image = f"{size}x{size}x{CHANNELS}"
        if "error" in r:
            rows.append([model, image, str(r.get("batch", "-")), r["error"], "", "", ""])
            continue
        low, high = r["speedup_range"]
        rows.append([model, image, str(r["batch"]), f"{1e3 * r['fp32_seconds']:.1f}",
                     f"{1e3 * r['bf16_seconds']:.1f}", f"{r['speedup']:.2f}x",
                     f"{low:.2f}-{high:.2f}x"])
    print_table(["model", "image", "batch", "fp32 step ms", "bf16 step ms", "speed-up",
                 "range over rounds"], rows)


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
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            total = 0.0
            for width, count in ((3 * dim, 1), (dim, 3)):  # QKV; attention out, MLP in and out
                a = torch.randn(tokens, dim, dtype=dtype)
                w = torch.randn(dim, width, dtype=dtype)
                g = torch.randn(tokens, width, dtype=dtype)
                products = [lambda: a @ w, lambda: g @ w.T, lambda: a.T @ g]  # noqa: B023
                for product in products:
                    total += count * median_seconds(product, 1, 5, args.budget)
            seconds[dtype] = total
        speedups[size] = seconds[torch.float32] / seconds[torch.bfloat16]
        rows.append([f"{size}x{size}x{CHANNELS}", f"{tokens:,}",
                     f"{1e3 * seconds[torch.float32]:.1f}", f"{1e3 * seconds[torch.bfloat16]:.1f}",
                     f"{speedups[size]:.2f}x"])
    print_table(["image", "tokens", "fp32 ms per block", "bf16 ms per block", "speed-up"], rows)
    return speedups


def compare_attention(args: argparse.Namespace, batches: dict[int, int]) -> dict[int, dict]:
    """Prints the attention-layer table; returns its timings by image size."""
    try:
        import axial_attention  # noqa: F401
    except ImportError:
        print("## Attention layer: skipped (pip install axial-attention to compare)")
        print()
        return {}
    print("## Attention layer: unmasked row + column, width 256, 8 heads, forward + backward")
    print("ours = two axial_transformer.model.attention.AxialSelfAttention (row, column), summed; "
          "package = axial_attention.AxialAttention(dim=256, heads=8, dim_index=-1, "
          "sum_axial_out=True); input [B, H, W, 256], fp32")
    timings, rows = {}, []
    for size in args.sizes:
        # B = step batch x channels: what one attention layer of the model sees in a step.
        r = attention_seconds(size, batches[size] * CHANNELS, args.warmup, args.repeats,
                              args.budget)
        timings[size] = r
        rows.append([f"{r['batch']}x{size}x{size}x256", f"{1e3 * r['ours']:.2f}",
                     f"{1e3 * r['package']:.2f}", f"{r['package'] / r['ours']:.2f}x"])
    print_table(["input", "ours ms", "package ms", "speed-up"], rows)
    print()
    return timings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats, to check that the script runs")
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
    parser.add_argument("--warmup", type=int, help="warm-up steps after the FLOP-counted one")
    parser.add_argument("--repeats", type=int, help="timed steps (median reported)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timing per case before stopping at 3 repeats")
    parser.add_argument("--case-timeout", type=float, default=1200.0,
                        help="seconds before a case counts as not fitting in time")
    # Internal: one case in a fresh process (peak memory is per process).
    parser.add_argument("--case", choices=["step", "paired"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["axial", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    args.sizes = args.sizes or ([4, 8] if args.quick else [16, 32, 64])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (2 if args.quick else 7)
    for name in ("threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if any(s < 1 for s in args.sizes):
        parser.error(f"--sizes must be positive, got {args.sizes}")
    if args.case and None in (args.model, args.precision, args.size, args.batch):
        parser.error(f"--case {args.case} needs --model, --precision, --size and --batch")
    return args


def main() -> None:
    args = parse_args()
    if args.case:
        torch.set_num_threads(args.threads)
        run_case = run_step_case if args.case == "step" else run_paired_case
        print(json.dumps(run_case(args)))
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
