"""Axial attention on CNN feature maps: this package's AxialAttention against the
`axial-attention` package and against full self-attention over the flattened map.

Every layer gets a [8, 128, S, S] feature map and returns the sum of row and column attention
(full attention: all S*S positions at once), 8 heads each. Measured per case: forward+backward
time (median of torch.utils.benchmark's blocked_autorange) and peak memory, the ru_maxrss of a
fresh process that ran only that case; "net" subtracts the ru_maxrss of a process that only
built the inputs.

    python bench/layer_bench.py                  # 32x32 and 64x64, torch's default threads
    python bench/layer_bench.py --threads 4
    python bench/layer_bench.py --quick          # tiny shapes, checks that everything runs

Needs `pip install axial-attention` (the `bench` extra) for the comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import resource

import torch
import torch.nn.functional as F
from einops import rearrange
from machine import machine_line, seconds, table
from torch import nn

METHODS = {
    "axial_transformer": "axial_transformer.layers.AxialAttention (ours)",
    "axial_attention": "axial-attention package AxialAttention",
    "full": "full self-attention, SDPA over S*S tokens",
}


class FullSelfAttention(nn.Module):
    """Every position attends to every other: the (S*S)^2 baseline axial attention avoids."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.to_qkv, self.to_out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        tokens = rearrange(x, "b d h w -> b (h w) d")
        q, k, v = rearrange(self.to_qkv(tokens), "b t (i n e) -> i b n t e", i=3, n=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b n t e -> b t (n e)")
        return rearrange(self.to_out(out), "b (h w) d -> b d h w", h=h, w=w)


def build_layer(method: str, dim: int, heads: int) -> nn.Module:
    if method == "axial_transformer":
        from axial_transformer.layers import AxialAttention

        return AxialAttention(dim, heads, dim_index=1, sum_axes=True)
    if method == "axial_attention":
        import axial_attention

        return axial_attention.AxialAttention(dim, heads=heads, dim_index=1, sum_axial_out=True)
    return FullSelfAttention(dim, heads)


def case(args: argparse.Namespace, method: str | None, size: int) -> tuple[float | None, float]:
    """(ms of forward + backward, this process's peak MB) of one layer, in a fresh process;
    method None only builds the inputs."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dim, size, size).requires_grad_()
    grad = torch.randn_like(x)
    ms = None
    if method:
        layer = build_layer(method, args.dim, args.heads)
        ms = 1e3 * seconds(lambda: layer(x).backward(grad), args.min_run_time)
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def in_fresh_process(args: argparse.Namespace, method: str | None, size: int):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(case, (args, method, size))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks that it runs")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (default: torch's)")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per case (default 2)")
    args = p.parse_args()
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if importlib.util.find_spec("axial_attention") is None:  # every ratio is against it
        p.error("needs the axial-attention package: pip install -e '.[bench]'")
    args.batch, args.dim, args.heads = (2, 32, 4) if args.quick else (8, 128, 8)
    if args.min_run_time is None:
        args.min_run_time = 0 if args.quick else 2
    print(f"# Axial attention layer benchmark, {machine_line('fp32', args.threads)}")
    print(f"# batch {args.batch}, {args.dim} channels, {args.heads} heads, forward+backward; "
          "peak: ru_maxrss of a fresh process per case; net: minus a process that only built "
          "the inputs\n")
    rows = []
    for size in (8, 12) if args.quick else (32, 64):
        base = in_fresh_process(args, None, size)[1]
        results = {m: in_fresh_process(args, m, size) for m in METHODS}
        ref_ms, ref_mb = results["axial_attention"]
        for method, (ms, mb) in results.items():
            mem_ratio = f"{(mb - base) / (ref_mb - base):.2f}x" if ref_mb > base else "n/a"
            rows.append([METHODS[method], f"{size}x{size}", f"{ms:.1f}", f"{mb:.0f}",
                         f"{mb - base:.0f}", f"{ms / ref_ms:.2f}x", mem_ratio])
        rows.append(["(inputs only: baseline process)", f"{size}x{size}", "", f"{base:.0f}", "0",
                     "", ""])
    table(["layer", "map", "fwd+bwd ms", "peak MB", "net MB", "time vs pkg", "net mem vs pkg"],
          rows)


if __name__ == "__main__":
    main()
