"""Axial attention on CNN feature maps: this package's AxialAttention against the
`axial-attention` package and against full self-attention over the flattened map.

Every layer gets a [8, 128, S, S] feature map and returns the sum of row and column attention
(full attention: all S*S positions at once), 8 heads each. Measured per case: forward+backward
time (median over repeats) and peak memory, the ru_maxrss of a fresh subprocess that ran only that
case; "net" subtracts the ru_maxrss of a process that only imported torch and built the inputs.

    python bench/layer_bench.py                  # 32x32 and 64x64, torch's default threads
    python bench/layer_bench.py --threads 4
    python bench/layer_bench.py --quick          # tiny shapes, checks that everything runs

Needs `pip install axial-attention` (the `bench` extra) for the comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from machine import machine_line

METHODS = {
    "axial_transformer": "axial_transformer.layers.AxialAttention (ours)",
    "axial_attention": "axial-attention package AxialAttention",
    "full": "full self-attention, SDPA over S*S tokens",
}


def build_inputs(batch: int, dim: int, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, size, size, generator=g).requires_grad_()
    grad = torch.randn(batch, dim, size, size, generator=g)
    return x, grad


def build_layer(method: str, dim: int, heads: int):
    import torch
    import torch.nn.functional as F
    from einops import rearrange
    from torch import nn

    if method == "axial_transformer":
        from axial_transformer.layers import AxialAttention

        return AxialAttention(dim, heads, dim_index=1, sum_axes=True)
    if method == "axial_attention":
        import axial_attention

        return axial_attention.AxialAttention(dim, heads=heads, dim_index=1, sum_axial_out=True)

    class FullSelfAttention(nn.Module):
        """Every position attends to every other: the (S*S)^2 baseline axial attention avoids."""

        def __init__(self) -> None:
            super().__init__()
            self.to_qkv, self.to_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[2:]
            tokens = rearrange(x, "b d h w -> b (h w) d")
            q, k, v = rearrange(self.to_qkv(tokens), "b t (i n e) -> i b n t e", i=3, n=heads)
            out = rearrange(F.scaled_dot_product_attention(q, k, v), "b n t e -> b t (n e)")
            return rearrange(self.to_out(out), "b (h w) d -> b d h w", h=h, w=w)

    return FullSelfAttention()


def worker(args: argparse.Namespace) -> None:
    """One case in this process; prints a JSON line. method 'baseline' only builds the inputs."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, grad = build_inputs(args.batch, args.dim, args.size)
    times = []
    if args.worker != "baseline":
        layer = build_layer(args.worker, args.dim, args.heads)
        for step in range(args.warmup + args.repeats):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            layer(x).backward(grad)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"ms": 1e3 * statistics.median(times) if times else None, "rss_mb": rss_mb}))


def run_case(method: str, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--size", str(size)]
    for flag in ("threads", "batch", "dim", "heads", "repeats", "warmup"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{method} at {size}x{size} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks that it runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    p.add_argument("--worker", choices=["baseline", *METHODS], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")

    quick = args.quick
    args.batch = args.batch or (2 if quick else 8)
    args.dim = args.dim or (32 if quick else 128)
    args.heads = args.heads or (4 if quick else 8)
    args.repeats = args.repeats or (3 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if args.worker:
        args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or 1
        worker(args)
        return

    import torch

    args.threads = args.threads or torch.get_num_threads()
    sizes = (8, 12) if quick else (32, 64)
    print(f"# Axial attention layer benchmark, {datetime.date.today().isoformat()}")
    print(f"# CPU: {machine_line('fp32', args.threads)} ({os.cpu_count()} logical cores)")
    print(f"# batch {args.batch}, {args.dim} channels, {args.heads} heads, forward+backward, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print("# peak: ru_maxrss of a fresh process per case; net: minus a process that only built "
          "the inputs\n")
    header = (f"| {'layer':<47} | map   | fwd+bwd ms | peak MB | net MB | "
              "time vs pkg | net mem vs pkg |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for size in sizes:
        base = run_case("baseline", size, args)["rss_mb"]
        results = {m: run_case(m, size, args) for m in METHODS}
        ref = results["axial_attention"]
        for method, r in results.items():
            net = r["rss_mb"] - base
            ref_net = ref["rss_mb"] - base
            time_ratio = f"{r['ms'] / ref['ms']:.2f}x"
            mem_ratio = f"{net / ref_net:.2f}x" if ref_net > 0 else "n/a"
            print(f"| {METHODS[method]:<47} | {f'{size}x{size}':<5} | {r['ms']:>10.1f} | "
                  f"{r['rss_mb']:>7.0f} | {net:>6.0f} | {time_ratio:>11} | {mem_ratio:>14} |")
        print(f"| {'(inputs only: baseline process)':<47} | {f'{size}x{size}':<5} | {'':>10} | "
              f"{base:>7.0f} | {0:>6.0f} | {'':>11} | {'':>14} |")


if __name__ == "__main__":
    main()
